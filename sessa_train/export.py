"""Export a training checkpoint for inference, and load an export.

An export is a folder:

    model.safetensors   the SessaLM state dict (names as ``SessaLM.state_dict()``; with tied
                        embeddings ``lm_head.weight`` is left out, it is ``embed.weight``)
    config.json         {"format": "sessa-export-v1", "model": ModelConfig fields, "dtype",
                        "step", "tokens", "document_masking"} and the keys transformers reads
    tokenizer.model and/or tokenizer.json
                        the tokenizer the training data was tokenized with: a sentencepiece
                        model (with its tokenizer.json made by transformers' converter), or a
                        Hugging Face tokenizers file
    tokenizer_config.json, special_tokens_map.json
                        so that ``transformers.AutoTokenizer.from_pretrained(path)`` gives a
                        ``PreTrainedTokenizerFast`` (no code of ours) that encodes exactly as that
                        tokenizer; where the converter is missing (transformers 4) the export
                        ships tokenization_sessa.py instead (``trust_remote_code=True``)
    configuration_sessa.py, modeling_sessa.py, sessa_model.py
                        so that ``transformers.AutoModelForCausalLM.from_pretrained(path,
                        trust_remote_code=True)`` loads it (transformers 4.56+ and 5.x);
                        sessa_model.py is the model's source, generated from the package
                        (``hf/bundle.py``): sessa-train need not be installed to load it

Weights are the plain fp32 weights ``checkpoint.read_weights`` reads from any layout. An export
is written into a sibling ``<out>.partial`` folder and moved into place when complete; an
earlier export in ``out`` is replaced (files it did not write stay), any other non-empty folder
refused. Loading checks the
config and every tensor's name, shape and dtype against the model before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from sessa_train.checkpoint import read_weights
from sessa_train.config import ModelConfig
from sessa_train.errors import CheckpointError
from sessa_train.files import readable_by_group
from sessa_train.models import SessaLM

log = logging.getLogger(__name__)

FORMAT = "sessa-export-v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
HF_FILES = ("configuration_sessa.py", "modeling_sessa.py")
# every file an export writes; anything else in an export folder (a README, evaluation results)
# is the user's and stays when the folder is exported into again
EXPORT_FILES = frozenset({
    "model.safetensors", "config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenization_sessa.py", "sessa_model.py", *HF_FILES,
})  # fmt: skip


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """Write an export of ``checkpoint`` into ``out_dir`` (created, or an earlier export replaced)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    weights, about = read_weights(checkpoint)
    cfg = ModelConfig.from_dict(about["config"]["model"])
    with torch.device("meta"):
        expected = SessaLM(cfg).state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing or any(weights[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(f"{checkpoint}: weights do not match its model config (missing: {missing[:5]})")
    tok = export_tokenizer(about, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok.path} has {tok.vocab_size} ids, the checkpoint's model only "
                              f"{cfg.vocab_size}: not the tokenizer of this model")  # fmt: skip
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out_dir} is a file, not a folder: choose an empty or new folder")
    if out.exists() and any(out.iterdir()) and not _is_export(out):
        raise CheckpointError(f"{out} is not empty and holds no export: choose an empty or new folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {k: weights[k].to(DTYPES[dtype]).contiguous() for k in expected}
    if cfg.tie_embeddings:
        del tensors["lm_head.weight"]
    # "format": "pt" is what transformers 4.x requires of a safetensors file it loads
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt", "sessa_format": FORMAT})
    shutil.copyfile(tok.path, partial / tok.file_name)
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
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        # trained on packed documents with document masking: a document starts after every EOS
        "document_masking": bool(about["config"].get("data", {}).get("document_masking", False)),
    }
    from sessa_train.hf.bundle import model_source

    for name in HF_FILES:
        shutil.copyfile(Path(__file__).parent / "hf" / name, partial / name)
    (partial / "sessa_model.py").write_text(model_source())
    _write_tokenizer_config(partial, tok)
    (partial / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    readable_by_group(partial)
    if out.exists():  # an earlier export: swapped for the new one, keeping what the export did not write
        for other in out.iterdir():
            if other.name not in EXPORT_FILES and not (partial / other.name).exists():
                os.replace(other, partial / other.name)
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    return out


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_tokenizer_config(out: Path, tok) -> None:
    """tokenizer_config.json and special_tokens_map.json for ``AutoTokenizer``: transformers' fast
    tokenizer over a tokenizer.json, which for a sentencepiece model is written beside its
    tokenizer.model by transformers' own converter; where that converter is missing (transformers
    below 5, or none installed) or encodes differently, the shipped sentencepiece class
    (tokenization_sessa.py, loaded with ``trust_remote_code=True``)."""
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.kind == "sentencepiece":
        specials = {"eos_token": tok.token(tok.eos_id), "unk_token": tok.token(tok.sp.unk_id())}
        if tok.bos_id is not None:
            specials["bos_token"] = tok.token(tok.bos_id)
        fast = _fast_sentencepiece(tok)
        if fast is not None:
            fast.save(str(out / "tokenizer.json"))
        else:
            log.warning(
                "%s: transformers' converter cannot give this sentencepiece model as a fast tokenizer here; the "
                "export ships tokenization_sessa.py (AutoTokenizer needs trust_remote_code=True)",
                tok.path,
            )
            shutil.copyfile(Path(__file__).parent / "hf" / "tokenization_sessa.py", out / "tokenization_sessa.py")
            config = {
                "tokenizer_class": "SessaSentencePieceTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_sessa.SessaSentencePieceTokenizer", None]},
            }
    else:
        specials = {"eos_token": tok.eos_token}
    specials["pad_token"] = specials["eos_token"]  # batches are padded with EOS (masked by attention_mask)
    config |= specials | {"model_max_length": 1 << 30, "clean_up_tokenization_spaces": False, "padding_side": "left"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# texts a converted tokenizer must encode and decode as sentencepiece does: edge cases of
# whitespace, digits and scripts outside the vocabulary, then the standard library's reference topics
CHECK_TEXTS = ("Hello world", "  two  spaces\n\nand\ttabs  ", "café 42, 1234567.89", "ünï 日本語 🙂", " lead", "trail ",
               "")  # fmt: skip
CHECK_TOPICS = 40


def _fast_sentencepiece(tok):
    """The ``tokenizers.Tokenizer`` transformers' sentencepiece converter makes of ``tok``'s model
    (``SpmConverter.build_tokenizer_from_spm_proto``, transformers 5), or None where that is not
    available or the result encodes or decodes a check text otherwise than sentencepiece.

    (A unigram model's Viterbi ties can split a rare word otherwise; ``tokenizers`` also reads
    the literal text of a special token, "</s>", as that token, as every fast tokenizer does.)"""
    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    except ImportError:
        return None
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        return None
    from pydoc_data.topics import topics

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    bpe = proto.trainer_spec.model_type == 2
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)} if bpe else pieces
    fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if fast is None:
        return None
    for text in (*CHECK_TEXTS, *(topics[name] for name in sorted(topics)[:CHECK_TOPICS])):
        ids = tok.encode(text)
        if fast.encode(text, add_special_tokens=False).ids != ids or fast.decode(ids) != tok.decode(ids):
            return None
    return fast


def export_tokenizer(about: dict, given: str | Path | None):
    """The tokenizer an export carries (``data.Tokenizer``): the checkpoint's own, or ``given``,
    which must be the one the run's data was written with when the checkpoint records it."""
    from sessa_train.data import Tokenizer

    recorded = about["tokenizer_sha256"]
    if given is None:
        if about["tokenizer"] is None:
            raise CheckpointError(
                "the checkpoint carries no tokenizer (its run found none beside its data and had no data.tokenizer): "
                "pass the tokenizer its data was written with, --tokenizer FILE"
            )
        given = about["tokenizer"]
    tok = Tokenizer(given)
    if recorded and tok.sha256 != recorded:
        raise CheckpointError(
            f"tokenizer {given} (sha256 {tok.sha256[:12]}...) is not the one the checkpoint's data was written with "
            f"(sha256 {recorded[:12]}...)"
        )
    return tok


def read_export(path: str | Path) -> tuple[ModelConfig, dict]:
    """(model config, config.json) of an export, checked; CheckpointError names what is wrong."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path} is not a sessa-train export (needs config.json and model.safetensors)")
    try:
        meta = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}/config.json has format {found!r}, expected {FORMAT!r}")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"dtype {meta['dtype']!r}; valid: {', '.join(DTYPES)}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json does not describe a model: {type(e).__name__}: {e}") from None
    return cfg, meta


def check_tensors(path: Path, cfg: ModelConfig, dtype: str) -> None:
    """Every tensor of model.safetensors has the name, shape and dtype the model has, read from the
    file's header and a model on the meta device: nothing is allocated before this holds."""
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):
        expected = SessaLM(cfg).state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    file = path / "model.safetensors"
    try:
        with safe_open(str(file), "pt") as fh:
            found = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file} cannot be read ({str(e).splitlines()[0]}): truncated or not safetensors"
        ) from None
    if missing := sorted(set(expected) - set(found)):
        raise CheckpointError(f"{file} lacks {missing[:3]} of the model its config.json describes")
    if extra := sorted(set(found) - set(expected)):
        raise CheckpointError(f"{file} holds {extra[:3]}, which the model of its config.json has no place for")
    for name, t in expected.items():
        shape, kind = found[name]
        if shape != tuple(t.shape):
            raise CheckpointError(
                f"{file}: {name} has shape {list(shape)}, its config.json's model needs {list(t.shape)}"
            )
        if SAFETENSORS_DTYPES.get(kind) != dtype:
            raise CheckpointError(f"{file}: {name} is {kind}, config.json says the export is {dtype}")


def load_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> SessaLM:
    """The plain (non-parallel) SessaLM of an export, in eval mode (checked before it is built)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg, meta = read_export(path)
    check_tensors(path, cfg, meta["dtype"])
    model = SessaLM(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    if cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed.weight"]
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype or DTYPES[meta["dtype"]]).eval()


def load_for_transformers(path: str | Path, *, device: str | torch.device = "cpu"):
    """(model, tokenizer) of an export as transformers objects, built from this package's own
    classes (``sessa_train.hf``), checked first: nothing shipped in the folder is imported or run,
    as with ``load_pretrained`` (``trust_remote_code`` is for people without sessa-train)."""
    path = Path(path)
    cfg, meta = read_export(path)
    check_tensors(path, cfg, meta["dtype"])
    from sessa_train.hf.modeling_sessa import SessaForCausalLM

    model = SessaForCausalLM.from_pretrained(str(path)).to(device=device, dtype=DTYPES[meta["dtype"]]).eval()
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    elif (path / "tokenizer.model").is_file():
        from sessa_train.hf.tokenization_sessa import SessaSentencePieceTokenizer

        tokenizer = SessaSentencePieceTokenizer.from_pretrained(str(path))
    else:
        raise CheckpointError(f"{path} holds no tokenizer (tokenizer.json or tokenizer.model)")
    return model, tokenizer
