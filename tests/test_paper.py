"""The paper's comparison: SymbolSoup as the reference specifies it, the matched Mamba-2 baseline,
one command per row of the results table (its tiny variant end to end) and the memory tail."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sessa_train import ModelConfig, SessaLM
from sessa_train.config import load_config
from sessa_train.errors import ConfigError
from sessa_train.evaluation import symbol_soup as ss
from tests.helpers import HANG_GUARD_S, script
from tests.trainer import ENV, REPO, losses, train, two_threads

# -- SymbolSoup ---------------------------------------------------------------------------


def blocks(ids: np.ndarray) -> list[list[str]]:
    """The symbols of the two stylized blocks (between <sep1> and <sep2>)."""
    out, current, inside = [], [], False
    for t in (ss.TOKENS[i] for i in ids):
        if t == "<sep1>":
            inside, current = True, []
        elif t == "<sep2>":
            inside = False
            out.append(current)
        elif inside and t in ss.SYMBOLS:
            current.append(t)
    return out


def markov_log_likelihood(block: list[str], style) -> float:
    """log P(block) under a style's unigram and preferred bigrams (motifs and flips ignored)."""
    unigram, bigrams, _ = style
    total, prev = 0.0, None
    for t in block:
        w = {u: p * (1 + ss.BIGRAM_STRENGTH) if prev and (prev, u) in bigrams else p for u, p in unigram.items()}
        total += math.log(w[t] / sum(w.values()))
        prev = t
    return total


def classify(ids: np.ndarray) -> int:
    """The most likely class under the style tables: which block is left, which styles."""
    a, b = blocks(ids)
    scores = [
        (markov_log_likelihood(x, ss.LEFT[left]) + markov_log_likelihood(y, ss.RIGHT[right]), left * ss.N_RIGHT + right)
        for x, y in ((a, b), (b, a))
        for left in range(ss.N_LEFT)
        for right in range(ss.N_RIGHT)
    ]
    return max(scores)[1]


@pytest.mark.parametrize("seq_len", [64, 128, 2048])
def test_symbol_soup_examples_have_the_specified_form(seq_len):
    low, high = ss.length_bounds(seq_len)
    lengths = []
    for index in range(40):
        ids, label_at = ss.sample_tokens(seq_len, 3, index)
        assert np.array_equal(ids, ss.sample_tokens(seq_len, 3, index)[0])  # deterministic
        tokens = [ss.TOKENS[i] for i in ids[: label_at + 1]]
        n = label_at + 1
        assert low <= n <= high and ids.shape == (seq_len + 1,) and ids.max() < ss.VOCAB_SIZE
        symbols = sum(t in ss.SYMBOLS for t in tokens)
        assert n == 2 * symbols + 13  # the reference's length rule
        assert [t for t in tokens if t in ss.SPECIALS] == ["<bos>", "<sep1>", "<sep2>", "<sep1>", "<sep2>", "<sep>",
                                                           "<label>"]  # fmt: skip
        assert tokens[-3:] == ["<sep>", " ", "<label>"] and tokens[1] == "\n"
        assert ids[label_at + 1] == ss.CLASS_IDS[index % 20] and ids[label_at + 2] == ss.EOS
        assert (ids[label_at + 3 :] == ss.PAD).all()
        lengths.append(n)
    assert len(set(lengths)) > 10  # lengths spread over the bounds
    assert not np.array_equal(ss.sample_tokens(seq_len, 4, 0)[0], ss.sample_tokens(seq_len, 3, 0)[0])


def test_symbol_soup_labels_follow_the_block_styles():
    """A likelihood classifier over the style tables finds the class far above chance (0.05), and
    better on longer examples: the label is a function of the two blocks' styles."""
    accuracy = {}
    for seq_len, n in ((128, 100), (2048, 60)):
        accuracy[seq_len] = np.mean([classify(ss.sample_tokens(seq_len, 0, i)[0]) == i % 20 for i in range(n)])
    assert accuracy[128] > 0.2 and accuracy[2048] > 0.8, accuracy


def test_symbol_soup_styles_are_distinct_and_built_as_specified():
    for styles in (ss.LEFT, ss.RIGHT):
        for unigram, bigrams, motifs in styles:
            assert sorted(unigram.values()) == [1.0] * 8 + [2.0] * 4 + [3.0] * 4 and len(bigrams) == 20
            assert len(motifs) == 14 + 13 + 12 and min(motifs.values()) >= 1.0
        assert len({tuple(sorted(u.items())) for u, _, _ in styles}) == len(styles)


# -- Mamba-2 ------------------------------------------------------------------------------

TINY = REPO / "configs" / "tiny.yaml"


def with_arch(cfg: ModelConfig, arch: str) -> ModelConfig:
    return dataclasses.replace(cfg, arch=arch)


@pytest.mark.parametrize("preset", ["tiny", "125m", "350m"])
def test_mamba2_is_parameter_matched_to_sessa_within_one_percent(preset):
    cfg = load_config([REPO / "configs" / f"{preset}.yaml"]).model
    with torch.device("meta"):
        counts = {a: SessaLM(with_arch(cfg, a)).num_parameters() for a in ("sessa", "mamba2", "transformer")}
    assert abs(counts["mamba2"] / counts["sessa"] - 1) < 0.01, counts
    assert abs(counts["transformer"] / counts["sessa"] - 1) < 0.01, counts


@pytest.fixture(scope="module")
def mamba() -> SessaLM:
    torch.manual_seed(0)
    return SessaLM(ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, arch="mamba2")).eval()


def test_mamba2_decode_equals_its_parallel_form(mamba):
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = mamba(ids)
        cache = mamba.init_cache(3, 40)
        steps = [mamba(ids[:, :7], cache)] + [mamba(ids[:, t : t + 1], cache) for t in range(7, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4 * full.abs().max()


def test_mamba2_layer_matches_the_library_module_and_its_own_cache(mamba):
    """The layer's mixer output equals a Mamba2Mixer of transformers built alone with the same
    weights (and its chunk of 256, where the layer scans 30 rows in one chunk of 32), in parallel
    form and step by step through transformers' own DynamicCache as its model builds it; the
    layer's own cache gives the same steps."""
    from transformers import DynamicCache
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from sessa_train.models.mamba2 import _library_config

    layer = mamba.layers["0"]
    theirs = Mamba2Mixer(_library_config(mamba.cfg), layer_idx=0).eval()
    theirs.load_state_dict(layer.mixer.state_dict())
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = layer.norm(x)
        expected = x + theirs(h)
        assert torch.allclose(layer(x) - layer.mlp(layer.mlp_norm(expected)), expected, atol=1e-6)
        assert (theirs.chunk_size, layer.mixer.chunk_size) == (256, 32)  # the same sums, one chunk of 32
        library, ours = DynamicCache(config=_library_config(mamba.cfg)), layer.init_cache(2, 30)
        ref = [theirs(h[:, :9], library)] + [theirs(h[:, t : t + 1], library) for t in range(9, 30)]
        got = [layer.mixer(h[:, :9], ours)] + [layer.mixer(h[:, t : t + 1], ours) for t in range(9, 30)]
    assert torch.equal(torch.cat(ref, 1), torch.cat(got, 1))
    assert (torch.cat(ref, 1) - theirs(h)).abs().max() < 1e-5


def test_mamba2_left_padded_batch_generates_as_each_row_alone(mamba):
    from sessa_train.generate import generate
    from sessa_train.models.positions import positions_of

    rows = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    ids = torch.zeros(2, 11, dtype=torch.int64)
    mask = torch.zeros(2, 11, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, 11 - len(r) :], mask[i, 11 - len(r) :] = r, 1
    with torch.no_grad():
        cache = mamba.init_cache(2, 12)
        prefill = mamba(ids, cache, position_ids=positions_of(ids, mask))[:, -1]
        step = mamba(torch.tensor([[3], [4]]), cache)[:, -1]
        for i, r in enumerate(rows):
            own = mamba.init_cache(1, 12)
            assert torch.allclose(prefill[i], mamba(r[None], own)[0, -1], atol=1e-5)
            assert torch.allclose(step[i], mamba(torch.tensor([[3 + i]]), own)[0, -1], atol=1e-5)
    batched = torch.stack(list(generate(mamba, ids, 6, attention_mask=mask)), 1)
    for i, r in enumerate(rows):
        assert torch.equal(batched[i], torch.stack(list(generate(mamba, r[None], 6)), 1)[0])


def test_mamba2_refuses_what_it_cannot_do_in_one_line(tmp_path):
    from sessa_train.parallel.plan import check_parallel_model

    cfg = load_config([TINY], ["model.arch=mamba2"]).model
    with pytest.raises(ConfigError, match=r"^model.arch=mamba2 cannot be split by parallel.tensor=2; valid: 1$"):
        check_parallel_model(cfg, tensor=2, pipeline=1)
    with pytest.raises(ConfigError, match=r"^model.arch=mamba2 cannot be split by parallel.context=2; valid: 1$"):
        check_parallel_model(cfg, tensor=1, pipeline=1, context=2)
    check_parallel_model(cfg, tensor=1, pipeline=2)  # pipeline stages take whole layers
    with pytest.raises(ConfigError, match=r"^data\.document_masking=true is not supported by model.arch=mamba2"):
        load_config([TINY], ["model.arch=mamba2", "data.document_masking=true"])
    with pytest.raises(ConfigError, match=r"needs 2 x model\.d_model divisible by 64, got d_model=48"):
        SessaLM(ModelConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=2, arch="mamba2"))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    model = SessaLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, arch="mamba2"))
    with pytest.raises(ValueError, match=r"model\.arch=mamba2 keeps no documents apart"):
        model(torch.zeros(1, 6, dtype=torch.int64), position_ids=positions)


@pytest.mark.slow
def test_mamba2_trains_resumes_and_exports_like_the_others(default_data, tmp_path):
    """The tiny preset as mamba2 (at half its depth): the loss falls; a resume continues
    the uninterrupted run exactly; the export gives the checkpoint's logits, also loaded by
    transformers (remote code)."""
    from transformers import AutoModelForCausalLM

    from sessa_train.evaluation.report import load_model
    from sessa_train.export import export_checkpoint, load_pretrained
    from tests.conftest import tiny_overrides

    def run(root: Path, *extra: str) -> None:
        steps = ("schedule.train_steps=24", "schedule.warmup_steps=6", "checkpoint.every_steps=12")
        logs = ("logging.eval_every_steps=0", "logging.every_steps=1")
        small = ("model.n_layers=2",)  # half the preset: its pure-torch scan is slow here
        train(TINY, *tiny_overrides(default_data, root), "model.arch=mamba2", *small, *steps, *logs, *extra, threads=2)

    run(tmp_path / "whole")
    whole = losses(tmp_path / "whole")
    assert len(whole) == 24 and np.mean([x for _, x in whole[-10:]]) < whole[0][1] - 1.5, whole[::10]
    (tmp_path / "split" / "ckpt").mkdir(parents=True)  # its step-12 checkpoint, resumed on its own
    shutil.copytree(tmp_path / "whole" / "ckpt" / "step_00000012", tmp_path / "split" / "ckpt" / "step_00000012")
    run(tmp_path / "split", "checkpoint.resume=auto")
    assert losses(tmp_path / "split") == whole[12:]
    export_checkpoint(tmp_path / "whole" / "ckpt", tmp_path / "export")
    ids = torch.randint(0, 4096, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(tmp_path / "whole" / "ckpt")(ids)
        assert torch.equal(load_pretrained(tmp_path / "export")(ids), expected)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
        assert torch.allclose(hf(ids).logits, expected, atol=1e-5)


# -- one command per row; the memory tail ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory) -> Path:
    """The tiny row of each architecture, 40 steps each (configs/paper/rows.yaml, sessa-paper-row)."""
    root = tmp_path_factory.mktemp("paper")
    for arch in ("sessa", "transformer", "mamba2"):
        cmd = [*script("sessa-paper-row"), "tiny", arch, "--runs", str(root), "--results",
               str(root / "results"), "schedule.train_steps=40", "schedule.warmup_steps=5",
               f"data.path={root / 'data'}", "logging.eval_every_steps=20"]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, env=ENV | two_threads(2), capture_output=True, text=True,
                             timeout=HANG_GUARD_S)  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert f"tiny-{arch}: accuracy 64: " in out.stdout
    return root


@pytest.mark.slow
def test_a_row_trains_evaluates_and_is_appended_to_the_results_table(tiny_rows):
    from sessa_train.evaluation.paper import TEST_SEED, read_sizes
    from sessa_train.evaluation.report import load_model
    from sessa_train.evaluation.tasks import make

    size = read_sizes()["tiny"]
    rows = json.loads((tiny_rows / "results" / "results.json").read_text())
    assert [r["row"] for r in rows] == ["tiny-mamba2", "tiny-sessa", "tiny-transformer"]
    params = {r["arch"]: r["parameters"] for r in rows}
    assert max(params.values()) / min(params.values()) < 1.01  # matched
    for r in rows:
        model = load_model(tiny_rows / r["row"] / "checkpoints")
        assert r["parameters"] == model.num_parameters() and r["steps"] == 40
        assert r["final_loss"] < r["first_loss"] - 1.0 and r["val_loss"] is not None
        assert sorted(map(int, r["accuracy"])) == size.eval_lengths
        right = total = 0  # recounted one sample at a time: the answer positions' argmax against the next token
        with torch.no_grad():
            for i in range(size.test):
                sample = make("symbol_soup", 128, TEST_SEED, i)
                tokens = torch.as_tensor(sample.tokens)
                logits = model(tokens[None, :-1])[0]
                right += sum(int(logits[a].argmax() == tokens[a + 1]) for a in sample.answers)
                total += len(sample.answers)
        assert r["accuracy"]["128"] == pytest.approx(right / total, abs=1.01 / total)  # a near tie may flip one
        assert r["tokens"] == 40 * 16 * 128
    table = (tiny_rows / "results" / "results.md").read_text().splitlines()
    assert table[0].startswith("| row | parameters |") and table[0].endswith("acc@64 | acc@128 | acc@256 |")
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| tiny-mamba2", "| tiny-sessa", "| tiny-transformer"]
    assert (tiny_rows / "results" / "accuracy.png").stat().st_size > 10_000


@pytest.mark.slow
def test_memory_tail_profiles_all_three_with_both_fits(tiny_rows, tmp_path):
    cmd = [sys.executable, "-m", "sessa_train.evaluation.memory_tail", "--seq-len", "64", "--batch", "2",
           "--targets", "2", "--out", str(tmp_path)]  # fmt: skip
    for arch in ("sessa", "transformer", "mamba2"):
        cmd += ["--model", f"{arch}-trained={tiny_rows / f'tiny-{arch}' / 'checkpoints'}"]
        cmd += ["--random", f"{arch}-init=configs/paper/tiny.yaml:{arch}"]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "memory_tail.json").read_text())
    assert len(rows) == 6 and (tmp_path / "memory_tail.png").is_file()
    for r in rows:  # both fits again with numpy's least-squares polynomial fit of log I(l)
        lags = np.arange(r["l_min"], r["l_max"] + 1, dtype=np.float64)
        log_i = np.log(np.asarray(r["influence"], dtype=np.float64)[r["l_min"] : r["l_max"] + 1])
        for feature, slope_key, c_key, rms_key in ((np.log(lags), "beta", "c", "rms_power"),
                                                   (lags, "lambda", "c_exp", "rms_exp")):  # fmt: skip
            slope, c = np.polyfit(feature, log_i, 1)
            rms = np.sqrt(np.mean((c + slope * feature - log_i) ** 2))
            assert (r[slope_key], r[c_key], r[rms_key]) == pytest.approx((-slope, c, rms), rel=1e-6, abs=1e-9)
        assert r["closer"] == ("power law" if r["rms_power"] < r["rms_exp"] else "exponential")
        assert f"| {r['model']} | {r['beta']:.3f} | {r['rms_power']:.3f} |" in out.stdout
