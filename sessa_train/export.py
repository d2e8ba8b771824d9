"""Export a training checkpoint for inference, and load an export.

An export is a folder:

    model.safetensors   the SessaLM state dict (names as ``SessaLM.state_dict()``; with tied
                        embeddings ``lm_head.weight`` is left out, it is ``embed.weight``)
    config.json         {"format": "sessa-export-v1", "model": ModelConfig fields, "dtype",
                        "step", "tokens"}
    tokenizer.model     the sentencepiece model the training data was tokenized with
    configuration_sessa.py, modeling_sessa.py, sessa_model.py
                        so that ``transformers.AutoModelForCausalLM.from_pretrained(path,
                        trust_remote_code=True)`` loads it (config.json carries the HF keys too);
                        sessa_model.py is the model's source, generated from the package
                        (``hf/bundle.py``): sessa-train need not be installed to load it

Weights are the plain fp32 weights ``checkpoint.read_weights`` reads from any layout.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from sessa_train.checkpoint import find_checkpoint, read_weights
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError, SessaError
from sessa_train.models import SessaLM

FORMAT = "sessa-export-v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """Write an export of ``checkpoint`` into ``out_dir`` (created; must not hold an export yet)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    weights, about = read_weights(checkpoint)
    cfg = ModelConfig.from_dict(about["config"]["model"])
    model = SessaLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing or any(weights[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{checkpoint}: weights do not match its model config (missing: {missing[:5]})")
    tok = export_tokenizer(about, tokenizer)
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise CheckpointError(f"{out} already holds an export: choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: weights[k].to(DTYPES[dtype]).contiguous() for k in expected}
    if cfg.tie_embeddings:
        del tensors["lm_head.weight"]
    # "format": "pt" is what transformers 4.x requires of a safetensors file it loads
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "sessa_format": FORMAT})
    shutil.copyfile(tok, out / "tokenizer.model")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "dtype": dtype}
    meta |= {"step": about["step"], "tokens": about["tokens"]}
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
        # trained on packed documents with document masking: a document starts after every EOS
        "document_masking": bool(about["config"].get("data", {}).get("document_masking", False)),
    }
    from sessa_train.hf.bundle import model_source

    for name in ("configuration_sessa.py", "modeling_sessa.py"):
        shutil.copyfile(Path(__file__).parent / "hf" / name, out / name)
    (out / "sessa_model.py").write_text(model_source())
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def export_tokenizer(about: dict, given: str | Path | None) -> Path:
    """The tokenizer an export carries: the checkpoint's own, or ``given``, which must be the one
    the run's data was written with when the checkpoint records it."""
    from sessa_train.data import Tokenizer

    recorded = about["tokenizer_sha256"]
    if given is None:
        if about["tokenizer"] is None:
            raise CheckpointError(
                "the checkpoint carries no tokenizer (its run found none beside its data and had no data.tokenizer): "
                "pass the sentencepiece model its data was written with, --tokenizer FILE"
            )
        given = about["tokenizer"]
    tok = Tokenizer(given)
    if recorded and tok.sha256 != recorded:
        raise CheckpointError(
            f"tokenizer {given} (sha256 {tok.sha256[:12]}...) is not the one the checkpoint's data was written with "
            f"(sha256 {recorded[:12]}...)"
        )
    return tok.path


def load_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SessaLM:
    """The plain (non-parallel) SessaLM of an export, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not a sessa-train export (needs config.json and model.safetensors)")
    try:
        meta = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}/config.json has format {found!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        dtype = dtype or DTYPES[meta["dtype"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json does not describe a model: {type(e).__name__}: {e}") from None
    model = SessaLM(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    if cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}/model.safetensors does not match its config: missing {missing}, extra {unexpected}"
        )
    return model.to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="sessa-export", description="Export a sessa-train checkpoint for inference.")
    p.add_argument("checkpoint", help="a step_N checkpoint folder, or a checkpoint root with a 'latest' file")
    p.add_argument("out", help="the export folder to create")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the one the checkpoint carries)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype)
    except SessaError as e:
        print(f"sessa-export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {find_checkpoint(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
