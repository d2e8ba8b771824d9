"""SessaLM / SessaLayer: causality, decode parity, backend parity, configuration errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from sessa_train import ModelConfig, SessaLM
from sessa_train.config import ComputeConfig
from sessa_train.models import ModelPlan, SessaLayer, SessaMixer
from sessa_train.models.reference_compat import convert_reference_layer_state_dict

VARIANTS = {
    "reference_like": {"n_heads": 1},
    "mha": {"n_heads": 4},
    "gqa_fb2_mlp_untied": {
        "n_heads": 4,
        "n_kv_heads": 2,
        "feedback_heads": 2,
        "ffn_hidden_size": 48,
        "tie_embeddings": False,
    },
    "no_rope": {"n_heads": 2, "rope": False},
}


def tiny(**overrides) -> ModelConfig:
    base = {"vocab_size": 61, "d_model": 32, "n_layers": 2}
    return ModelConfig(**{**base, **overrides})


def make_model(cfg: ModelConfig, seed: int = 0, backend: str = "auto", chunk: int = 8) -> SessaLM:
    torch.manual_seed(seed)
    model = SessaLM(cfg, ModelPlan(ComputeConfig(backend, chunk))).double()
    with torch.no_grad():  # move gamma away from its init so the feedback path matters
        for layer in model.layers.values():
            layer.mixer.gamma_bias.uniform_(0.5, 3.0)
    return model


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causality(variant, backend):
    model = make_model(tiny(**VARIANTS[variant]), backend=backend)
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    base = model(ids)
    for t in (0, 9, 17, 29):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 61
        out = model(changed)
        if t > 0:
            assert (out[:, :t] - base[:, :t]).abs().max().item() <= 1e-12
        assert (out[:, t:] - base[:, t:]).abs().max().item() > 1e-6  # the change is seen from t on


@pytest.mark.parametrize("prefill", [1, 6, 13])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_then_decode_equals_parallel_forward(variant, prefill):
    model = make_model(tiny(**VARIANTS[variant]))
    ids = torch.randint(0, 61, (3, 21), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = model.init_cache(batch_size=3, max_len=21)
    steps = [model(ids[:, :prefill], cache)]
    steps += [model(ids[:, t : t + 1], cache) for t in range(prefill, 21)]
    err = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert err < 1e-9, f"decode differs from the parallel forward by {err:.3e}"
    assert cache.length == 21


def test_cache_misuse_raises():
    model = make_model(tiny())
    ids = torch.randint(0, 61, (1, 8))
    cache = model.init_cache(1, max_len=8)
    model(ids[:, :4], cache)
    with pytest.raises(ValueError, match="one token at a time"):
        model(ids[:, 4:6], cache)
    model(ids[:, 4:8][:, :1], cache)
    cache = model.init_cache(1, max_len=4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(ids, cache)
    cache.layers = cache.layers[:1]
    with pytest.raises(ValueError, match="cache has 1 layers"):
        model(ids, cache)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_backends_agree_on_logits_and_every_gradient(variant):
    cfg = tiny(**VARIANTS[variant])
    chunked = make_model(cfg, backend="chunked", chunk=5)
    reference = copy.deepcopy(chunked)
    reference.plan.compute = ComputeConfig(feedback_backend="reference")  # the plan every module of the copy holds
    ids = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (chunked, reference):
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        results.append((logits, dict(model.named_parameters())))
    (lc, pc), (lr, pr) = results
    assert (lc - lr).abs().max() < 1e-9
    assert pc.keys() == pr.keys()
    for name in pc:
        err = (pc[name].grad - pr[name].grad).abs().max().item()
        assert err < 1e-9, f"grad of {name} differs by {err:.3e}"


def test_layer_input_gradient_matches_between_backends():
    cfg = tiny(n_heads=4)
    torch.manual_seed(0)
    plan = ModelPlan(ComputeConfig(feedback_chunk_size=8))
    layer = SessaLayer(cfg, plan).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("chunked", "reference"):
        plan.compute = ComputeConfig(feedback_backend=backend, feedback_chunk_size=8)
        (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x)
        grads.append(gx)
    assert (grads[0] - grads[1]).abs().max() < 1e-9


def expected_parameter_count(cfg: ModelConfig) -> int:
    """Parameter count written out from SESSA.md's layer equations."""
    D, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    per_layer = (
        2 * D  # LayerNorm
        + 2 * D * D
        + 2 * D  # W_in
        + D * D
        + D
        + 2 * (D * kv + kv)  # Wq, Wk, Wv with bias
        + (D * D if cfg.n_heads > 1 else 0)  # Wo, no bias
        + 2 * D * D
        + 2 * D  # W_fb
        + D * cfg.feedback_heads
        + cfg.feedback_heads  # gamma: w and b
        + D * D
        + D  # W_out
    )
    if cfg.ffn_hidden_size:
        per_layer += 2 * D + 2 * D * cfg.ffn_hidden_size + cfg.ffn_hidden_size + D
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * D
    return cfg.vocab_size * D + cfg.n_layers * per_layer + 2 * D + head


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_and_tying(variant):
    cfg = tiny(**VARIANTS[variant])
    model = SessaLM(cfg)
    assert model.num_parameters() == expected_parameter_count(cfg)
    assert (model.lm_head.weight is model.embed.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("n_heads", [1, 4])
def test_reference_state_dict_rename(n_heads):
    cfg = tiny(n_heads=n_heads)
    D = cfg.d_model
    # Keys and shapes of the public reference SessaLayer (LibratioAI/sessa, sessa/layer.py).
    reference_shapes = {
        "ln.weight": (D,),
        "ln.bias": (D,),
        "W_in.weight": (2 * D, D),
        "W_in.bias": (2 * D,),
        "mixer.gamma_bias": (),
        "mixer.q_proj.weight": (D, D),
        "mixer.q_proj.bias": (D,),
        "mixer.k_proj.weight": (D, D),
        "mixer.k_proj.bias": (D,),
        "mixer.v_proj.weight": (D, D),
        "mixer.v_proj.bias": (D,),
        "mixer.proj_fb.weight": (2 * D, D),
        "mixer.proj_fb.bias": (2 * D,),
        "mixer.gamma_ctx.weight": (1, D),
        "mixer.rope_inv_freq": (D // n_heads // 2,),
        "W_out.weight": (D, D),
        "W_out.bias": (D,),
    }
    if n_heads > 1:
        reference_shapes["mixer.out_proj.weight"] = (D, D)
    g = torch.Generator().manual_seed(0)
    reference = {k: torch.randn(shape, generator=g) for k, shape in reference_shapes.items()}
    layer = SessaLayer(cfg)
    layer.load_state_dict(convert_reference_layer_state_dict(reference), strict=True)
    assert torch.equal(layer.mixer.fb_proj.weight, reference["mixer.proj_fb.weight"])
    assert torch.equal(layer.in_proj.bias, reference["W_in.bias"])
    assert layer.mixer.gamma_bias.item() == reference["mixer.gamma_bias"].item()
    with pytest.raises(ValueError, match=re.escape("'mixer.unknown'")):
        convert_reference_layer_state_dict({**reference, "mixer.unknown": torch.zeros(1)})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "d_model=30 must be divisible by model.n_heads=4"),
        ({"d_model": 12, "n_heads": 4}, "RoPE needs an even head dim, got d_model/n_heads = 12/4 = 3"),
        ({"gamma_max": 1.0}, "gamma_max must be in (0, 1), got 1.0"),
        ({"gamma_max": 0.0}, "gamma_max must be in (0, 1), got 0.0"),
        ({"gamma_max": -0.5}, "gamma_max must be in (0, 1), got -0.5"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads=4 must be divisible by model.n_kv_heads=3"),
        ({"feedback_heads": 3}, "d_model=32 must be divisible by model.feedback_heads=3"),
        ({"n_layers": 0}, "n_layers must be a positive integer, got 0"),
        ({"ffn_hidden_size": -1}, "ffn_hidden_size must be an integer >= 0, got -1"),
        ({"compute": {"feedback_backend": "fast"}}, "compute.feedback_backend='fast'"),
        ({"compute": {"feedback_chunk_size": -1}}, "compute.feedback_chunk_size must be an integer >= 0, got -1"),
    ],
)
def test_bad_config_raises_value_error_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        if "compute" in overrides:
            ComputeConfig(**overrides["compute"])
        else:
            tiny(**overrides)


def test_odd_head_dim_is_fine_without_rope():
    assert tiny(d_model=12, n_heads=4, rope=False).head_dim == 3


def test_wrong_input_rank_raises_value_error():
    model = SessaLM(tiny())
    with pytest.raises(ValueError, match=re.escape("shape (batch, seq), got torch.int64 (2, 3, 4)")):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("got torch.float32")):
        model(torch.zeros(2, 3))
    mixer = SessaMixer(tiny())
    with pytest.raises(ValueError, match=re.escape("(batch, seq, 32), got (5, 32)")):
        mixer(torch.zeros(5, 32))


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("arch", ["sessa", "transformer"])
def test_recomputation_equals_keeping_activations_in_loss_and_every_gradient(arch, mode):
    """fp64, chunked solve: ``compute.recompute`` changes what the backward keeps, not what it
    computes (loss and every gradient within 1e-12), and it really recomputes: the attention core
    (selective) or every layer (full) runs once more per forward + backward."""
    cfg = tiny(**VARIANTS["gqa_fb2_mlp_untied"], arch=arch)
    kept = make_model(cfg, chunk=5) if arch == "sessa" else SessaLM(cfg, ModelPlan(ComputeConfig())).double()
    recomputed = copy.deepcopy(kept)
    recomputed.plan.compute = ComputeConfig(feedback_chunk_size=5, recompute=mode)
    ids = torch.randint(0, 61, (2, 23), generator=torch.Generator().manual_seed(3))
    calls = {"layer": 0, "attend": 0}

    def count(what):
        return lambda *args: calls.__setitem__(what, calls[what] + 1)

    for layer in recomputed.layers.values():
        layer.register_forward_pre_hook(count("layer"))  # a recomputation stops early: no post hook
    attend = recomputed.plan.attend
    recomputed.plan.attend = lambda *a: (count("attend")(), attend(*a))[1]  # the plan every layer holds
    results = []
    for model in (kept, recomputed):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).mean()
        loss.backward()
        results.append((loss, dict(model.named_parameters())))
    (loss_kept, kept_params), (loss_re, re_params) = results
    assert abs(loss_kept.item() - loss_re.item()) <= 1e-12
    for name, p in kept_params.items():
        err = (p.grad - re_params[name].grad).abs().max().item()
        assert err <= 1e-12, f"grad of {name} differs by {err:.3e} with recompute={mode}"
    n = cfg.n_layers
    assert calls == ({"layer": 2 * n, "attend": 2 * n} if mode == "full" else {"layer": n, "attend": 2 * n})


@pytest.mark.slow
def test_compiled_layers_keep_parity_with_eager():
    """fp32, chunked solve: ``compute.compile`` (torch.compile of each layer, inductor on CPU)
    gives the eager model's loss and every gradient within fp32 rounding."""
    cfg = tiny(**VARIANTS["gqa_fb2_mlp_untied"], n_layers=1)
    torch.manual_seed(0)
    eager = SessaLM(cfg, ModelPlan(ComputeConfig(feedback_chunk_size=8)))
    compiled = copy.deepcopy(eager)
    compiled.plan.compute = ComputeConfig(feedback_chunk_size=8, compile=True)
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (eager, compiled):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).mean()
        loss.backward()
        results.append((loss.item(), {k: p.grad for k, p in model.named_parameters()}))
    assert "compiled" in compiled.layers["0"].__dict__ and "compiled" not in eager.layers["0"].__dict__
    assert abs(results[0][0] - results[1][0]) <= 1e-5 * results[0][0]
    scale = max(g.abs().max().item() for g in results[0][1].values())
    for name, g in results[0][1].items():
        err = (g - results[1][1][name]).abs().max().item()
        assert err <= 1e-5 * scale, f"grad of {name} differs by {err:.2e}"
    assert compiled.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("variant", ["reference_like", "gqa_fb2_mlp_untied"])
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (2, 3), (1, 2)])
def test_each_rank_builds_its_part_without_the_whole_model_and_gets_the_plain_weights(variant, tp, pp, monkeypatch):
    """``rank_initial_state`` builds a TP x PP rank's initial weights one unit at a time: merged
    over the ranks they are exactly the plain model's for the same seed, and each rank builds
    only the units of its own stage (counted)."""
    import sessa_train.parallel.layout as layout

    cfg = tiny(**VARIANTS[variant], n_layers=3)
    torch.manual_seed(5)
    plain = SessaLM(cfg).state_dict()
    built: list[str] = []
    build = layout.build_unit
    monkeypatch.setattr(layout, "build_unit", lambda seed, name, make: built.append(name) or build(seed, name, make))
    states = {(p, t): layout.rank_initial_state(cfg, 5, t, tp, p, pp) for p in range(pp) for t in range(tp)}
    merged = layout.merge_states(states, cfg)
    assert merged.keys() == plain.keys()
    for name, t in plain.items():
        assert torch.equal(merged[name], t), name
    assert sorted(built) == sorted([*SessaLM.units(cfg, ModelPlan())] * tp)  # every unit once per TP rank
