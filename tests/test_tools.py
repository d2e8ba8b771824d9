"""The tools a team already uses, on the export and the run of a small model: transformers
(AutoModelForCausalLM, AutoTokenizer, padded batches), lm-evaluation-harness (sessa-eval and during
training), wandb (offline), the torch profiler, the command-line tools' start-up and file modes."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import HANG_GUARD_S
from tests.trainer import ENV, REPO, losses, train, write_config

pytestmark = pytest.mark.slow
PROMPTS = ["The module", "A class that defines the", "Return the", "If the argument", "This function"]


def write_tasks(folder: Path, mc: list[dict], gen: list[dict]) -> list[Path]:
    """A multiple-choice (loglikelihood) and a generate_until task of lm-eval over local JSONL files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ntarget_delimiter: ''\n"
    (folder / "sessa_mc.yaml").write_text(
        f"task: sessa_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "sessa_gen.yaml").write_text(
        f"task: sessa_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return [folder / "sessa_mc.yaml", folder / "sessa_gen.yaml"]


@pytest.fixture(scope="module")
def instrumented(shards, tmp_path_factory) -> Path:
    """4 steps of a model with an MLP, with lm-eval every 2 steps, wandb offline and a profile of
    steps 2-3 (one run for all of them)."""
    root = tmp_path_factory.mktemp("instrumented")
    tasks = write_tasks(root / "tasks", [{"question": "The", "choices": [" a", " b"], "label": 0}],
                        [{"prompt": "The", "answer": " x"}])  # fmt: skip
    cfg = write_config(root / "c.yaml", shards, root / "run", ffn_hidden_size=48)
    out = train(
        cfg,
        "schedule.train_steps=4",
        "checkpoint.every_steps=2",
        "logging.eval_every_steps=0",
        "logging.lm_eval.every_steps=2",
        f"logging.lm_eval.tasks=[{tasks[0]},{tasks[1]}]",
        "logging.wandb.project=sessa-test",
        "logging.wandb.mode=offline",
        "logging.profile_steps=[2,3]",
        env={"WANDB_SILENT": "true", "HF_MODULES_CACHE": str(root / "hf_modules")},
    )
    (root / "run" / "stderr.txt").write_text(out.stderr)
    return root / "run"


# -- transformers ------------------------------------------------------------------------------


def _converter() -> bool:
    """Whether this transformers converts a sentencepiece proto (5.x; not 4.57)."""
    from transformers.convert_slow_tokenizer import SpmConverter

    return hasattr(SpmConverter, "build_tokenizer_from_spm_proto")


def test_autotokenizer_encodes_as_the_training_tokenizer(exported, shards, caplog):
    """The export's sentencepiece tokenizer loads as transformers' own fast tokenizer with no code
    from the folder (AutoTokenizer refused remote code; PreTrainedTokenizerFast without a warning)
    and encodes and decodes as the training tokenizer; exported by a transformers without the
    converter (4.57: tools/compat_check.sh), through the shipped class."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from sessa_train.data import Tokenizer

    assert (exported / "tokenization_sessa.py").exists() != _converter() and (exported / "tokenizer.model").is_file()
    ours = Tokenizer(shards.parent / "tok.model")
    if _converter():
        with caplog.at_level("WARNING"):
            alone = PreTrainedTokenizerFast.from_pretrained(str(exported))
        assert not caplog.records, caplog.text
        theirs = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=False)
        assert isinstance(theirs, PreTrainedTokenizerFast)
    else:
        theirs = alone = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    assert theirs.eos_token_id == alone.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.eos_id
    from pydoc_data.topics import topics

    texts = [topics[name][:400] for name in sorted(topics)[-20:]] + ["  two  spaces\nand a newline", "café 42 ✓"]
    for text in texts:  # the export checked the first topics; these are others
        assert theirs(text)["input_ids"] == alone(text)["input_ids"] == ours.encode(text), text[:40]
        assert theirs.decode(ours.encode(text)) == text


@pytest.mark.parametrize("kind", ["bpe", "unigram-nfkc"])
def test_a_sentencepiece_export_loads_in_transformers_by_either_route(kind, tmp_path, monkeypatch):
    """Whichever way an export gives a sentencepiece model to AutoTokenizer (the converter's
    tokenizer.json, or tokenization_sessa.py where the converter is missing or encodes otherwise),
    it encodes as sentencepiece; our trainer's BPE always takes the first."""
    from pydoc_data.topics import topics

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from sessa_train import export
    from sessa_train.data import Tokenizer

    docs = [topics[name][:1500] for name in sorted(topics)[:40]]
    if kind == "bpe":
        from sessa_train.data import train_tokenizer

        model = train_tokenizer(docs, tmp_path / "tok.model", vocab_size=400)
    else:  # sentencepiece's defaults: unigram, NFKC, a dummy prefix, no byte fallback
        spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(tmp_path / "tok"),
                                       vocab_size=400, minloglevel=2)  # fmt: skip
        model = tmp_path / "tok.model"
    texts = [topics[name][:300] for name in sorted(topics)[-10:]] + ["\ufb01ne \uff21\uff22  x", "café 42"]
    for missing in (False, True):
        out = tmp_path / f"export-{missing}"
        out.mkdir()
        (out / "tokenizer.model").write_bytes(Path(model).read_bytes())
        with monkeypatch.context() as m:
            if missing:  # transformers 4: no converter of a proto
                m.setattr(export, "_fast_sentencepiece", lambda tok: None)
            export._write_tokenizer_config(out, Tokenizer(out / "tokenizer.model"))
        shipped = (out / "tokenization_sessa.py").exists()
        assert shipped != (out / "tokenizer.json").exists()
        theirs = AutoTokenizer.from_pretrained(str(out), trust_remote_code=shipped)
        ours = spm.SentencePieceProcessor(model_file=str(model))
        for text in texts:
            assert theirs(text)["input_ids"] == ours.encode(text), (missing, text[:40])
        if kind == "bpe":
            assert shipped == (missing or not _converter())


def test_padded_batches_compute_what_each_row_computes_alone(exported):
    """Left and right padding: the logits of real positions equal the unpadded ones (fp64), and a
    left-padded batch of prompts generates, greedily, exactly each prompt's own tokens (the
    transformers model and sessa_train.generate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sessa_train.export import load_pretrained
    from sessa_train.generate import generate

    tok = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    hf = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True).double().eval()
    ours = load_pretrained(exported, dtype=torch.float64)
    alone = [torch.tensor([tok(p)["input_ids"]]) for p in PROMPTS]
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = hf(**batch).logits
            for row, ids in enumerate(alone):
                real = batch["attention_mask"][row].bool()
                want = hf(ids).logits[0]
                assert (logits[row, real] - want).abs().max() < 1e-10, (side, row)
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    new = hf.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[:, -6:]
    ours_new = torch.stack(list(generate(ours, batch["input_ids"], 6, attention_mask=batch["attention_mask"])), 1)
    for row, ids in enumerate(alone):
        single = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, -6:]  # fmt: skip
        assert torch.equal(new[row], single) and torch.equal(ours_new[row], single), row


# -- lm-evaluation-harness ---------------------------------------------------------------------


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """What lm-eval's hf model scores: log p(continuation | context), the pair encoded together."""
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).log_softmax(-1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_sessa_eval_runs_lm_eval_whose_numbers_we_recompute(exported, tmp_path):
    """A multiple-choice task (labels: our own argmax for some items, another choice for others)
    and a generate_until task at batch size 4 (answers: our own greedy continuation for some), so
    that lm-eval's accuracy and exact match are known in advance."""
    from transformers import AutoTokenizer

    from sessa_train.export import load_pretrained
    from sessa_train.generate import generate

    tok = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)
    model = load_pretrained(exported)
    mc, right = [], []
    for i, prompt in enumerate(PROMPTS):
        choices = [" is", " the", " of"]
        best = max(range(3), key=lambda c: continuation_logprob(model, tok, prompt, choices[c]))
        label = best if i % 2 == 0 else (best + 1) % 3
        mc.append({"question": prompt, "choices": choices, "label": label})
        right.append(label == best)
    gen, matched = [], []
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        text = tok.decode(torch.stack(list(generate(model, ids, 4))).flatten().tolist()).split("\n")[0]
        answer = text if i in (0, 3) else text + " nothing"
        gen.append({"prompt": prompt, "answer": answer})
        matched.append(i in (0, 3))
    tasks = write_tasks(tmp_path / "tasks", mc, gen)
    cmd = [sys.executable, "-m", "sessa_train.evaluation.harness", str(exported), "--tasks", *map(str, tasks)]
    out = subprocess.run([*cmd, "--batch-size", "4"], capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S,
                         env=ENV | {"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((exported / "lm_eval.json").read_text())["results"]
    assert results["sessa_mc"]["acc,none"] == pytest.approx(sum(right) / len(right))
    assert results["sessa_gen"]["exact_match,none"] == pytest.approx(sum(matched) / len(matched))
    assert f"lm_eval/sessa_mc/acc: {sum(right) / len(right):.4f}" in out.stdout


def test_lm_eval_during_training_is_logged_at_its_steps(instrumented):
    rows = [json.loads(x) for x in (instrumented / "tb" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "train/loss" in r}
    for step in (2, 4):
        assert "lm_eval/sessa_mc/acc" in by_step[step] and "lm_eval/sessa_gen/exact_match" in by_step[step]
        results = json.loads((instrumented / "tb" / "lm_eval" / f"step_{step:08d}.json").read_text())
        assert results["results"]["sessa_mc"]["acc,none"] == by_step[step]["lm_eval/sessa_mc/acc"]
    assert "lm_eval/sessa_mc/acc" not in by_step[1]


# -- wandb, profiler ---------------------------------------------------------------------------


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline wandb run file (LevelDB-style records of wandb's protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_holds_the_scalars_of_metrics_jsonl(instrumented):
    (run_file,) = (instrumented / "tb" / "wandb").glob("offline-run-*/run-*.wandb")
    history = {r["_step"]: r for r in wandb_history(run_file)}
    rows = {r["step"]: r for r in map(json.loads, (instrumented / "tb" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(history) == [1, 2, 3, 4]
    for step, row in history.items():
        for key, value in row.items():
            if not key.startswith("_"):
                assert rows[step][key] == pytest.approx(value), (step, key)
        assert {k for k in rows[step] if "/" in k} == {k for k in row if not k.startswith("_")}


def test_the_profile_holds_the_labels_of_the_work(instrumented):
    traces = list((instrumented / "tb" / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    for label in ("sessa.solve", "sessa.attention", "sessa.mlp", "sessa.optimizer", "sessa.communication"):
        assert label in names, label
    assert "USDT" not in (instrumented / "stderr.txt").read_text()  # kineto's start and stop lines


def test_only_the_profilers_usdt_lines_are_dropped(capfd):
    from sessa_train.trainer.profiling import _without_usdt_lines

    with _without_usdt_lines():
        os.write(2, b"USDT:2026-12-05 12:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a warning of someone else\n")
        sys.stderr.write("and one through python\n")
    err = capfd.readouterr().err  # (pytest's sys.stderr is not file descriptor 2: the order may differ)
    assert sorted(err.splitlines()) == ["a warning of someone else", "and one through python"]


# -- command-line tools ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["sessa_train.train:main", "sessa_train.cli:export_main", "sessa_train.cli:generate_main",
     "sessa_train.cli:plan_main", "sessa_train.data.cli:write_shards_main", "sessa_train.data.cli:train_tokenizer_main",
     "sessa_train.evaluation.harness:main", "sessa_train.launch:main"],
)  # fmt: skip
def test_help_answers_without_importing_torch(entry):
    module, function = entry.split(":")
    code = (
        f"import sys\nfrom {module} import {function} as main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'light')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "light", out.stdout[-500:] + out.stderr[-500:]


def test_exported_and_checkpoint_files_are_readable_by_the_group(instrumented, exported):
    mask = os.umask(0)
    os.umask(mask)
    for folder in (exported, instrumented / "ckpt" / "step_00000004"):
        for f in folder.rglob("*"):
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert losses(instrumented)[-1][0] == 4
