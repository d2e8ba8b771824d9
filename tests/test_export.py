"""Export of a real 2-process ZeRO-2 checkpoint, loading it, and generation from it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sessa_train import SessaLM, load_pretrained
from sessa_train.checkpoint import read_weights
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError, SessaError
from sessa_train.export import export_checkpoint
from sessa_train.generate import generate
from tests.helpers import HANG_GUARD_S, script
from tests.trainer import ENV, REPO, final_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(zero2_run) -> Path:
    """conftest's 2-process ZeRO-2 run (8 steps); ``exported`` is its export."""
    return zero2_run


def trained_model(run: Path) -> SessaLM:
    _, client = read_weights(run / "ckpt")
    model = SessaLM(ModelConfig.from_dict(client["config"]["model"]))
    model.load_state_dict(final_weights(run))
    return model.eval()


def test_export_holds_the_trained_weights_and_gives_the_same_logits(run, exported, shards):
    from safetensors.torch import load_file

    trained = final_weights(run)
    tensors = load_file(str(exported / "model.safetensors"))  # plain safetensors, no sessa-train code
    assert set(tensors) == set(trained) - {"lm_head.weight"}  # tied: lm_head.weight is embed.weight
    assert all(torch.equal(tensors[k], trained[k]) for k in tensors)
    tokens = torch.randint(0, 400, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_pretrained(exported)(tokens), trained_model(run)(tokens))
    assert (exported / "tokenizer.model").read_bytes() == (shards.parent / "tok.model").read_bytes()


def test_tensor_names_are_documented(exported):
    from safetensors.torch import load_file

    doc = (REPO / "docs" / "export.md").read_text()
    for name, tensor in load_file(str(exported / "model.safetensors")).items():
        pattern = re.sub(r"layers\.\d+\.", "layers.{i}.", name)
        assert f"`{pattern}`" in doc, f"{pattern} is not documented in docs/export.md"
        assert tensor.dtype == torch.float32


def test_greedy_generation_equals_argmax_of_the_parallel_forward(exported):
    model = load_pretrained(exported)
    seq = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(1))
    for ids in generate(model, seq.clone(), 16, temperature=0.0):
        with torch.no_grad():
            expected = model(seq)[:, -1].argmax(dim=-1)
        assert torch.equal(ids, expected)
        seq = torch.cat([seq, ids.unsqueeze(1)], dim=1)
    assert seq.shape == (2, 23)


def test_sampling_is_seeded_and_filters_reduce_to_greedy(exported):
    model = load_pretrained(exported)
    prompt = torch.randint(0, 400, (1, 5), generator=torch.Generator().manual_seed(2))

    def run(**kw):
        return torch.cat(list(generate(model, prompt, 12, generator=torch.Generator().manual_seed(3), **kw)))

    greedy = run(temperature=0.0)
    assert torch.equal(run(temperature=1.0, top_k=1), greedy)
    assert torch.equal(run(temperature=1.0, top_p=1e-6), greedy)
    assert torch.equal(run(temperature=1.0), run(temperature=1.0))  # same seed, same text
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        run(top_p=0.0)


def test_generate_cli_streams_the_greedy_continuation(exported):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(exported / "tokenizer.model"))
    prompt = "The module"
    ids = sp.encode(prompt)
    new = torch.cat(list(generate(load_pretrained(exported), torch.tensor([ids]), 8, eos_id=sp.eos_id())))
    cmd = [*script("sessa-generate"), str(exported), "--prompt", prompt]
    out = subprocess.run(
        [*cmd, "--temperature", "0", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=HANG_GUARD_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.rstrip("\n") == sp.decode(ids + new.tolist())
    prompts = ["The module", "Return a new list of the"]  # two prompts: one padded batch, each as alone
    alone = []
    for text in prompts:
        ids = sp.encode(text)
        steps = [int(t) for t in torch.cat(list(generate(load_pretrained(exported), torch.tensor([ids]), 8)))]
        if sp.eos_id() in steps:
            steps = steps[: steps.index(sp.eos_id()) + 1]
        alone.append(sp.decode(ids + steps))
    cmd = [*script("sessa-generate"), str(exported), "--prompt", prompts[0], "--prompt", prompts[1]]
    out = subprocess.run([*cmd, "--temperature", "0", "--max-new-tokens", "8"], capture_output=True, text=True,
                         env=ENV, cwd=REPO, timeout=HANG_GUARD_S)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines == [f"[{i + 1}] {text}" for i, text in enumerate(alone)]


def test_export_errors_are_one_line(run, tmp_path, exported):
    cmd = [*script("sessa-export"), str(tmp_path), str(tmp_path / "out")]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip() == f"sessa-export: error: {tmp_path} is not a complete checkpoint "
        "(no meta.json); pass a step_N folder, or the checkpoint.dir whose 'latest' names one"
    )
    with pytest.raises(SessaError, match=r"tokenizer model not found: /nonexistent\.model"):
        export_checkpoint(run / "ckpt", tmp_path / "e", tokenizer="/nonexistent.model")
    users = tmp_path / "users"  # #30: a folder of the user's own files is never written into
    users.mkdir()
    (users / "tokenizer.model").write_text("mine")
    with pytest.raises(CheckpointError, match="is not empty and holds no export: choose an empty or new folder"):
        export_checkpoint(run / "ckpt", users)
    assert [p.name for p in users.iterdir()] == ["tokenizer.model"] and (
        users / "tokenizer.model"
    ).read_text() == "mine"
    assert not (tmp_path / "users.partial").exists()
    with pytest.raises(CheckpointError, match="is not a sessa-train export"):
        load_pretrained(tmp_path)


def test_export_takes_the_tokenizer_the_checkpoint_carries(run, shards, tmp_path):
    """#15.6: run from another directory, with another tokenizer.model there, the export packs the
    run's own; a tokenizer passed by hand must be that one; a run that found none says so."""
    import shutil

    from sessa_train.data import train_tokenizer

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = train_tokenizer(small_texts(), elsewhere / "tokenizer.model", vocab_size=450)
    cmd = [*script("sessa-export"), str(run / "ckpt"), str(tmp_path / "out")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=elsewhere, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (shards.parent / "tok.model").read_bytes()
    with pytest.raises(CheckpointError, match=f"tokenizer {other} .* is not the one the checkpoint's data was written"):
        export_checkpoint(run / "ckpt", tmp_path / "e2", tokenizer=other)
    bare = tmp_path / "bare"
    shutil.copytree(run / "ckpt" / "step_00000008", bare / "step_00000008")
    manifest = json.loads((bare / "step_00000008" / "manifest.json").read_text())
    (bare / "step_00000008" / "tokenizer.model").unlink()
    del manifest["files"]["tokenizer.model"]
    (bare / "step_00000008" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"carries no tokenizer .* pass the tokenizer its data was written with"):
        export_checkpoint(bare / "step_00000008", tmp_path / "e3")


def small_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name][:1500] for name in sorted(topics)][:40]


def test_export_refuses_a_damaged_checkpoint_naming_the_file(run, tmp_path):
    import shutil

    copy = tmp_path / "step_00000008"
    shutil.copytree(run / "ckpt" / "step_00000008", copy)
    part = sorted((copy / "model").glob("*.safetensors"))[0]
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{part} has .* bytes, the manifest says"):
        export_checkpoint(copy, tmp_path / "e")


def test_generate_bad_device_and_bad_config_are_one_line(exported, tmp_path):
    import shutil

    def generate_cli(folder: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [*script("sessa-generate"), str(folder), "--prompt", "The", "--max-new-tokens", "2"]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=HANG_GUARD_S)

    if not torch.cuda.is_available():
        out = generate_cli(exported, "--device", "cuda")
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            "sessa-generate: error: --device cuda: this machine has no CUDA device; valid: cpu"
        ], out.stderr
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model"]["d_model"] = "wide"
    (broken / "config.json").write_text(json.dumps(config))
    out = generate_cli(broken)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"{broken}/config.json does not describe a model" in out.stderr


HF_WITHOUT_SESSA_TRAIN = """
import sys
sys.modules["sessa_train"] = None  # any import of the package fails
import torch
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(4))
with torch.no_grad():
    torch.save(hf(ids).logits, sys.argv[2])
"""


def test_the_export_is_self_contained_for_transformers(exported, tmp_path):
    """#15: the export's remote code does not import sessa_train; its model source is generated
    from the package at export time and gives load_pretrained's logits bit for bit."""
    env = ENV | {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    cmd = [sys.executable, "-c", HF_WITHOUT_SESSA_TRAIN, str(exported), str(tmp_path / "logits.pt")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), load_pretrained(exported)(ids))
    source = (exported / "sessa_model.py").read_text()
    assert "class SessaLM" in source and not re.search(r"^\s*(from|import)\s+sessa_train", source, re.MULTILINE)


def test_transformers_loads_the_export_with_equal_logits_and_cached_generate(exported, caplog):
    """Also on transformers 5.x, where the recurrent state is called ``cache``: generate hands it
    back to every step (one token per forward) and nothing warns of a deprecated name."""
    import logging

    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.warning_once.cache_clear()  # warnings given earlier in this process count too
    transformers.utils.logging.enable_propagation()
    caplog.set_level(logging.WARNING, logger="transformers")
    hf = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True).eval()
    ours = load_pretrained(exported)
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids))  # the same network, bit for bit
    lengths = []
    hf.embed.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    out = hf.generate(
        ids[:, :6],
        attention_mask=torch.ones(2, 6, dtype=torch.long),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(out[:, 6:], torch.stack(list(generate(ours, ids[:, :6], 10)), dim=1))
    assert lengths == [6] + [1] * 9  # prefill once, then one token per step through the recurrent cache
    assert not [r.message for r in caplog.records if "deprecated" in r.message], transformers.__version__
    lengths.clear()  # use_cache=False: every step sees the whole sequence, and the tokens are the same
    uncached = hf.generate(ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long), max_new_tokens=10,
                           do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)  # fmt: skip
    assert lengths == list(range(6, 16)) and torch.equal(uncached, out)
