"""Export a training checkpoint for inference, and load an export.

An export is a folder:

    model.safetensors   the SessaLM state dict (names as ``SessaLM.state_dict()``; with tied
                        embeddings ``lm_head.weight`` is left out, it is ``embed.weight``)
    config.json         {"format": "sessa-export-v1", "model": ModelConfig fields, "dtype",
                        "step", "tokens"}
    tokenizer.model     the sentencepiece model the training data was tokenized with
    configuration_sessa.py, modeling_sessa.py
                        so that ``transformers.AutoModelForCausalLM.from_pretrained(path,
                        trust_remote_code=True)`` loads it (config.json carries the HF keys too)

Weights come from DeepSpeed's checkpoint: with ZeRO optimizer shards present they are the
fp32 master weights consolidated by ``deepspeed.utils.zero_to_fp32`` (ZeRO 1-3, any
data-parallel size), otherwise the module weights of ``mp_rank_00_model_states.pt``.
A tensor/pipeline/context-parallel checkpoint holds one ``mp_rank_XX_model_states.pt`` per
model-parallel (TP x PP) rank; their module weights are merged back to the plain layout
(``parallel/layout.py``). Those
are the fp32 weights of an fp32 run, the bf16 module weights of a bf16 run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from sessa_train.config import ModelConfig
from sessa_train.models import SessaLM

FORMAT = "sessa-export-v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A checkpoint or export that cannot be used; the message names the path and the problem."""


MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete ``step_N`` folder, or a checkpoint root whose ``latest`` names one."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not any((path / name).is_file() for name in MODEL_STATES):
        raise ExportError(f"{path} is not a complete checkpoint (no {MODEL_STATES[0]}); pass a step_N folder")
    return path


def checkpoint_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 model state dict, our client state: step, tokens, resolved config) of a checkpoint."""
    path = resolve_checkpoint(path)
    states_file = next(path / name for name in MODEL_STATES if (path / name).is_file())
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    if "config" not in states:
        raise ExportError(f"{path} was not written by sessa-train (no resolved config in its client state)")
    parallel = states["config"].get("parallel", {})
    tensor, pipeline = parallel.get("tensor", 1), parallel.get("pipeline", 1)
    if tensor * pipeline * parallel.get("context", 1) > 1:  # trained as megatron-core stages
        weights = _merge_model_parallel(path, states, tensor, pipeline)
    elif any(path.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        weights = states["module"]
    return {k: v.float() for k, v in weights.items()}, states


def _merge_model_parallel(path: Path, first: dict, tensor: int, pipeline: int) -> dict[str, torch.Tensor]:
    """The plain state of a TP x PP checkpoint: DeepSpeed wrote one module file per model-parallel
    rank m = pp_rank * tensor + tp_rank (parallel/state.py); layout.merge_lm_states joins them."""
    from sessa_train.parallel.layout import merge_lm_states

    stages = {}
    for m in range(tensor * pipeline):
        file = path / f"mp_rank_{m:02d}_model_states.pt"
        if not file.is_file():
            need = f"a tensor={tensor} x pipeline={pipeline} checkpoint has one per model-parallel rank"
            raise ExportError(f"{path} lacks {file.name}: {need}")
        states = first if m == 0 else torch.load(file, map_location="cpu", weights_only=False)
        stages[divmod(m, tensor)] = states["module"]
    return merge_lm_states(stages, ModelConfig(**first["config"]["model"]))


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """Write an export of ``checkpoint`` into ``out_dir`` (created; must not hold an export yet)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    weights, client = checkpoint_state(checkpoint)
    cfg = ModelConfig(**client["config"]["model"])
    model = SessaLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing or any(weights[k].shape != expected[k].shape for k in expected):
        raise ExportError(f"{checkpoint}: weights do not match its model config (missing: {missing[:5]})")
    tok = Path(tokenizer) if tokenizer is not None else Path(client["config"]["data"]["tokenizer"])
    if not tok.is_file():
        raise ExportError(f"tokenizer {tok} not found: pass the sentencepiece model with --tokenizer")
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise ExportError(f"{out} already holds an export: choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: weights[k].to(DTYPES[dtype]).contiguous() for k in expected}
    if cfg.tie_embeddings:
        del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": FORMAT})
    shutil.copyfile(tok, out / "tokenizer.model")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "dtype": dtype}
    meta |= {"step": client["step"], "tokens": client["tokens"]}
    meta |= {  # Hugging Face transformers (remote code shipped in the folder)
        "model_type": "sessa",
        "architectures": ["SessaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sessa.SessaConfig",
            "AutoModelForCausalLM": "modeling_sessa.SessaForCausalLM",
        },
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
    }
    for name in ("configuration_sessa.py", "modeling_sessa.py"):
        shutil.copyfile(Path(__file__).parent / "hf" / name, out / name)
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SessaLM:
    """The plain (non-parallel) SessaLM of an export, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ExportError(f"{path} is not a sessa-train export (needs config.json and model.safetensors)")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}/config.json has format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = ModelConfig(**meta["model"])
    model = SessaLM(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    if cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}/model.safetensors does not match its config: missing {missing}, extra {unexpected}")
    return model.to(device=device, dtype=dtype or DTYPES[meta["dtype"]]).eval()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="sessa-export", description="Export a sessa-train checkpoint for inference.")
    p.add_argument("checkpoint", help="a step_N checkpoint folder, or a checkpoint root with a 'latest' file")
    p.add_argument("out", help="the export folder to create")
    p.add_argument("--tokenizer", help="sentencepiece model (default: data.tokenizer of the run's config)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    except ExportError as e:
        print(f"sessa-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
