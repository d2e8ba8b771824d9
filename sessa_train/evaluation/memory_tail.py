"""The memory-tail diagnostic: how strongly a layer's output at t depends on the input l tokens back.

    I(l) = mean over batch and target positions t of || d h_t / d x_{t-l} ||_F

x = the token embeddings (B, T, D), h = the output of the last layer (before the final norm).
Each target t takes D backward passes (one per output channel), each giving a row of the
Jacobian against every earlier position at once. Two shapes are fitted by least squares to
log I(l) over l in [l_min, l_max]:

    power law     log I = c - beta log l        (the paper's claim for Sessa: a heavy tail)
    exponential   log I = c - lambda l          (a state-space model's decay, e.g. Mamba)

and both fits' residuals (RMS of log I minus the fit) are reported: the smaller one says which
shape the measured tail has, whatever the exponents are.

    python -m sessa_train.evaluation.memory_tail --model sessa=runs/x/ckpt --random sessa-random=configs/tiny.yaml \\
        --seq-len 256 --out runs/memory_tail
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from sessa_train.models import SessaLM


def last_hidden(model: SessaLM, x: torch.Tensor) -> torch.Tensor:
    """The last layer's output for input embeddings x (B, T, D)."""
    for layer in model.layers.values():
        x = layer(x)
    return x


def influence_by_lag(model: SessaLM, tokens: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """I(l) for l = 0..max(targets): (max(targets) + 1,), averaged over batch and targets."""
    model.eval()
    x = model.embed(tokens).detach().requires_grad_()
    h = last_hidden(model, x)
    B, _, D = h.shape
    lags = max(targets) + 1
    total = torch.zeros(lags, dtype=torch.float64)
    for t in targets:
        squares = torch.zeros(B, t + 1, dtype=torch.float64)
        for i in range(D):
            (g,) = torch.autograd.grad(h[:, t, i].sum(), x, retain_graph=True)  # rows of the samples' Jacobians
            squares += g[:, : t + 1].double().square().sum(-1)
        norms = squares.sqrt().flip(1).mean(0)  # index l = lag t - s
        total[: t + 1] += norms
    counts = torch.tensor([sum(1 for t in targets if t >= lag) for lag in range(lags)], dtype=torch.float64)
    return total / counts


def _fit(influence: torch.Tensor, l_min: int, l_max: int, feature) -> tuple[float, float, float]:
    """(-slope, c, rms residual) of log I(l) = c + slope * feature(l) over l_min <= l <= l_max."""
    lags = torch.arange(l_min, l_max + 1, dtype=torch.float64)
    y = influence[l_min : l_max + 1].double().log()
    X = torch.stack([torch.ones_like(lags), feature(lags)], dim=1)
    solution = torch.linalg.lstsq(X, y.unsqueeze(1)).solution
    rms = float((X @ solution - y.unsqueeze(1)).square().mean().sqrt())
    c, slope = solution.squeeze(1).tolist()
    return -slope, c, rms


def fit_power_law(influence: torch.Tensor, l_min: int, l_max: int) -> tuple[float, float]:
    """(beta, c) of log I(l) = c - beta log l by least squares over l_min <= l <= l_max."""
    beta, c, _ = _fit(influence, l_min, l_max, torch.log)
    return beta, c


def fits(influence: torch.Tensor, l_min: int, l_max: int) -> dict[str, float]:
    """Both shapes' parameters and residuals: beta, c, rms_power, lambda, c_exp, rms_exp."""
    beta, c, rms_power = _fit(influence, l_min, l_max, torch.log)
    lam, c_exp, rms_exp = _fit(influence, l_min, l_max, lambda lags: lags)
    return {"beta": beta, "c": c, "rms_power": rms_power, "lambda": lam, "c_exp": c_exp, "rms_exp": rms_exp}


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sessa_train.config import load_config
    from sessa_train.errors import argument_parser
    from sessa_train.evaluation.report import load_model

    p = argument_parser(prog="python -m sessa_train.evaluation.memory_tail", description=__doc__)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        help="NAME=PATH of an export or checkpoint; repeatable",
    )
    p.add_argument(
        "--random",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        help="NAME=CONFIG.yaml[:arch]: a randomly initialised model of that config; repeatable",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--targets", type=int, default=4, help="target positions, the last ones of the sequence")
    p.add_argument("--l-min", type=int, default=4)
    p.add_argument("--l-max", type=int, default=0, help="default: half the sequence (clear of its start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/memory_tail"))
    args = p.parse_args(argv)
    if not args.model and not args.random:
        p.error("give at least one --model or --random")
    if not 1 <= args.l_min < args.seq_len - args.targets:
        p.error(f"--l-min must be in [1, seq_len - targets), got {args.l_min}")
    models = {}
    for name, path in args.model:
        models[name] = load_model(path)
    for name, spec in args.random:
        path, _, arch = spec.partition(":")
        cfg = load_config([Path(path)], [f"model.arch={arch}"] if arch else []).model
        torch.manual_seed(args.seed)
        models[name] = SessaLM(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = list(range(args.seq_len - args.targets, args.seq_len))
    l_max = args.l_max or args.seq_len // 2
    if not args.l_min < l_max <= targets[0]:
        p.error(f"--l-max must be in ({args.l_min}, {targets[0]}], got {l_max}")
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = []
    print("| model | power law: beta | rms | exponential: lambda | rms | closer fit |\n|---|---|---|---|---|---|")
    for name, model in models.items():
        g = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq_len), generator=g)
        influence = influence_by_lag(model, tokens, targets)
        f = fits(influence, args.l_min, l_max)
        closer = "power law" if f["rms_power"] < f["rms_exp"] else "exponential"
        rows.append({"model": name, **f, "closer": closer, "l_min": args.l_min, "l_max": l_max,
                     "influence": influence.tolist()})  # fmt: skip
        print(
            f"| {name} | {f['beta']:.3f} | {f['rms_power']:.3f} | {f['lambda']:.4f} | {f['rms_exp']:.3f} | {closer} |"
        )
        lags = list(range(1, len(influence)))
        (line,) = ax.loglog(lags, influence[1:].tolist(), label=f"{name}: {closer}")
        ends = (args.l_min, l_max)
        ax.loglog(ends, [math.exp(f["c"]) * lag ** -f["beta"] for lag in ends], ":", color=line.get_color(), lw=0.8)
        span = range(args.l_min, l_max + 1)
        ax.loglog(span, [math.exp(f["c_exp"] - f["lambda"] * lag) for lag in span], "--", color=line.get_color(),
                  lw=0.6)  # fmt: skip
    ax.set_title("dotted: power-law fit, dashed: exponential fit", fontsize=8)
    ax.set_xlabel("lag l")
    ax.set_ylabel("|| d h_t / d x_{t-l} ||")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "memory_tail.png", dpi=120)
    (args.out / "memory_tail.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out / 'memory_tail.png'}, {args.out / 'memory_tail.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
