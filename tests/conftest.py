"""Test-session set-up: Triton kernels run in its CPU interpreter when no GPU is present
(TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any
test module is collected); the small tokenized corpus the trainer and export tests train on.
"""

import os
from pathlib import Path

import pytest
import torch

from sessa_train.data import train_tokenizer, write_shards

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Tokenizer (vocab 400) and shards (samples of 32 tokens) of 40 pydoc topics."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("train_data")
    docs = [topics[name][:1500] for name in sorted(topics)][:40]
    model = train_tokenizer(docs, root / "tok.model", vocab_size=400)
    write_shards(docs, model, root / "shards", seq_len=31, samples_per_shard=40, val_fraction=0.1)
    return root / "shards"
