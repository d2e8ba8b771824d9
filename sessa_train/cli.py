"""Command-line front-ends of export, generation and planning: ``sessa-export``, ``sessa-generate``
and ``sessa-plan`` (console scripts; the library modules they drive have no ``__main__``).

Each parses its arguments before importing torch or the library it drives, so ``--help`` and
argument errors answer at once. Bad input ends with one line on stderr and exit status 2; a
plan that does not fit with exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys

from sessa_train.errors import SessaError, argument_parser, user_error


def _finite(kind: type, low: float | None = None):
    """An argparse type: a number of ``kind`` that is finite (and >= ``low``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            raise argparse.ArgumentTypeError(f"{text!r}: need a finite number{bound}")
        return value

    return parse


def export_main(argv: list[str] | None = None) -> int:
    p = argument_parser(prog="sessa-export", description="Export a sessa-train checkpoint for inference.")
    p.add_argument("checkpoint", help="a step_N checkpoint folder, or a checkpoint root with a 'latest' file")
    p.add_argument("out", help="the export folder to create (an earlier export there is replaced)")
    p.add_argument("--tokenizer", help="the tokenizer file (default: the one the checkpoint carries)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    from sessa_train.checkpoint import find_checkpoint
    from sessa_train.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    except SessaError as e:
        return user_error(p.prog, e)
    print(f"exported {find_checkpoint(args.checkpoint)} to {out}")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    """sessa-generate EXPORT --prompt "The module" --max-new-tokens 64 --temperature 0.8 --top-p 0.95"""
    p = argument_parser(prog="sessa-generate", description="Generate text from an export (recurrent decode).")
    p.add_argument("export", help="a folder written by sessa-export")
    p.add_argument("--prompt", action="append", default=[], help="repeatable: several prompts run as one batch")
    p.add_argument("--prompts-file", help="a text file of prompts, one per line (added to --prompt)")
    p.add_argument("--max-new-tokens", type=_finite(int, 1), default=64)
    p.add_argument("--temperature", type=_finite(float, 0.0), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=_finite(int, 0), default=0, help="0 = off")
    p.add_argument("--top-p", type=_finite(float), default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=_finite(int, 0), default=0, help="0 .. 2**63 - 1")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error(f"argument --top-p: {args.top_p} is not in (0, 1]")
    if args.seed >= 2**63:
        p.error(f"argument --seed: {args.seed} is not in 0 .. 2**63 - 1")
    import torch

    from sessa_train.data import Tokenizer
    from sessa_train.export import load_pretrained, read_export
    from sessa_train.generate import check_room, device_named, generate

    try:
        device = device_named(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _, meta = read_export(args.export)
        tokenizer = Tokenizer(_tokenizer_file(args.export))
        prompts = list(args.prompt) + _prompts_file(args.prompts_file)
        if not prompts:
            raise SessaError("give --prompt TEXT (repeatable) or --prompts-file FILE")
        encoded = [tokenizer.encode(text) for text in prompts]
        if empty := [i + 1 for i, ids in enumerate(encoded) if not ids]:
            raise SessaError(f"prompt {empty[0]} of {len(prompts)} encodes to no tokens")
        model = load_pretrained(args.export, device=device)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise SessaError(f"{args.export}: its tokenizer has {tokenizer.vocab_size} ids, its model only "
                             f"{model.cfg.vocab_size}: not an export of one run")  # fmt: skip
        longest = max(map(len, encoded))
        check_room(model, len(encoded) * (longest + args.max_new_tokens), device)
    except SessaError as e:
        return user_error(p.prog, e)
    # one batch, left-padded (each row generates what it would alone: generate's attention_mask)
    batch = torch.tensor([[tokenizer.eos_id] * (longest - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded])
    steps = generate(
        model,
        batch,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        attention_mask=mask if len(encoded) > 1 else None,
        document_eos=tokenizer.eos_id if meta.get("document_masking") else None,
        vocab=tokenizer.vocab_size,
    )
    outs = [list(ids) for ids in encoded]
    if len(encoded) == 1:  # one prompt: its continuation streams as it comes
        shown = tokenizer.decode(outs[0])
        print(shown, end="", flush=True)
        for next_id in steps:
            outs[0].append(int(next_id[0]))
            text = tokenizer.decode(outs[0])
            print(text[len(shown) :], end="", flush=True)
            shown = text
        print()
        return 0
    done = [False] * len(outs)
    for next_id in steps:
        for row, token in enumerate(next_id.tolist()):
            if not done[row]:
                outs[row].append(token)
                done[row] = token == tokenizer.eos_id
    for row, ids in enumerate(outs):
        print(f"[{row + 1}] {tokenizer.decode(ids)}")
    return 0


def _prompts_file(path: str | None) -> list[str]:
    if path is None:
        return []
    from pathlib import Path

    try:
        return [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SessaError(f"--prompts-file {path} cannot be read ({type(e).__name__})") from None


def _tokenizer_file(export: str) -> str:
    from pathlib import Path

    for name in ("tokenizer.model", "tokenizer.json"):
        if (Path(export) / name).is_file():
            return str(Path(export) / name)
    raise SessaError(f"{export} holds no tokenizer (tokenizer.model or tokenizer.json)")


def plan_main(argv: list[str] | None = None) -> int:
    p = argument_parser(
        prog="sessa-plan",
        description="Per-rank memory and a step-time model of a config under a layout (sessa_train/sizing.py).",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--seq-len", type=_finite(int, 1), required=True)
    p.add_argument("--gpu", choices=["A100", "H100", "H200"], default="H100")
    p.add_argument("--nodes", type=_finite(int, 1), default=1)
    p.add_argument("--gpus-per-node", type=_finite(int, 1), default=8)
    p.add_argument("--efficiency", type=_finite(float), default=0.5, help="fraction of peak the model's matmuls reach")
    p.add_argument("--runtime-gib", type=_finite(float, 0.0), default=1.0, help="CUDA context, NCCL, allocator slack")
    p.add_argument("--fp32", action="store_true", help="plan fp32 instead of bf16")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (parallel.tensor=2 ...)")
    args = p.parse_args(argv)
    if not 0 < args.efficiency <= 1:
        p.error(f"argument --efficiency: {args.efficiency} is not in (0, 1]")
    from sessa_train.config import load_config
    from sessa_train.parallel.plan import check_layout
    from sessa_train.sizing import plan

    try:
        cfg = load_config([args.config], args.overrides)
        check_layout(cfg, args.nodes * args.gpus_per_node)  # what sessa-train refuses, refused here
    except SessaError as e:
        return user_error(p.prog, e)
    found = plan(cfg, args.seq_len, gpu=args.gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                 efficiency=args.efficiency, runtime_gib=args.runtime_gib, bf16=not args.fp32)  # fmt: skip
    _print_plan(found, args.config, args.efficiency)
    if problem := found.problem():
        print(f"sessa-plan: {problem}", file=sys.stderr)
        return 1
    return 0


def _print_plan(found, config: str, efficiency: float) -> None:
    from sessa_train.hardware import GiB
    from sessa_train.sizing import stage_parameters

    job, gpu, t = found.job, found.gpu, found.step
    layout = f"tensor={job.tensor} pipeline={job.pipeline} context={job.context} data={job.data} zero={job.zero}"
    layout += " sequence_parallel" if job.sequence_parallel else ""
    layout += f" virtual_stages={job.virtual}" if job.virtual > 1 else ""
    print(f"{config}: seq {job.seq_len}, {layout}, {job.micro_batches} micro-batches of {job.micro_batch}")
    print(f"{stage_parameters(job.model, job.tensor, job.pipeline) / 1e6:.1f}M parameters on the busiest rank")
    print("| per-rank memory | GiB |\n|---|---|")
    for item, b in found.memory.items():
        print(f"| {item} | {b / GiB:.2f} |")
    print(f"| **total** | **{found.total / GiB:.2f}** of {gpu.memory / GiB:.1f} on {gpu.name} |")
    print(f"host memory per rank while saving a checkpoint: {found.host_bytes / GiB:.2f} GiB (CPU copies of its share)")
    print("| step time | s |\n|---|---|")
    for item in ("compute", "pipeline bubble", "gradient reduction", "tensor-parallel collectives", "total"):
        print(f"| {item} | {t[item]:.3f} |")
    print(f"{t['tokens/s']:,.0f} tokens/s, MFU {t['mfu']:.1%} (at {efficiency:.0%} matmul efficiency)")
