"""Data pipeline throughput on this machine: shard writing and loading, in tokens/s,
against the tokens/s one tiny-model training step consumes on the same CPU; loading from an
S3-compatible server on 127.0.0.1 (moto) beside local disk; peak memory of sessa-write-shards
on a large generated input.

    python tools/bench_data.py                      # uses (and if needed builds) data/default/
    python tools/bench_data.py --s3                 # + rows loading the same shards from S3
    python tools/bench_data.py --rss 300            # peak RSS writing shards of 300 MB of text
    python tools/bench_data.py --serve-s3 9000      # an S3 server with the shards, until killed
    python tools/bench_data.py --load PATH          # one epoch from PATH (a folder or s3://...)

The last two time whole processes, e.g. local disk against S3 in alternating runs:
``--load data/default/shards`` vs ``--load s3://bench/shards`` with ``AWS_ENDPOINT_URL`` set to
the served endpoint (and ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` any non-empty value).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sessa_train.config import load_config
from sessa_train.data import PackedTokenLoader
from sessa_train.data.cli import prepare_default_data_main
from sessa_train.data.documents import iter_documents
from sessa_train.data.shards import write_shards
from sessa_train.models import SessaLM

TINY_PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def bench_write(corpus: Path, tokenizer: Path, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        index = write_shards(iter_documents([corpus]), tokenizer, out, seq_len=seq_len, samples_per_shard=128)
        seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in index["splits"].values())
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_load(shards: Path | str, micro_batch: int, workers: int) -> dict:
    loader = PackedTokenLoader(shards, micro_batch_size=micro_batch, num_workers=workers, max_epochs=1)
    start = time.perf_counter()
    tokens = sum(b["tokens"].numel() for b in loader)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_with(shards: Path, port: int = 0):
    """A moto S3 server on 127.0.0.1 holding ``shards`` as s3://bench/shards; yields (endpoint, url)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(S3_CREDENTIALS | {"AWS_ENDPOINT_URL": endpoint})
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    for file in sorted(shards.iterdir()):
        client.upload_file(str(file), "bench", f"shards/{file.name}")
    try:
        yield endpoint, "s3://bench/shards"
    finally:
        server.stop()


# the peak RSS (KiB) of a command and its children, measured from a small parent: on Linux a child
# forked from this (torch-sized) process would count this process's size as its own peak
PEAK_OF = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def bench_rss(megabytes: int, tokenizer: Path, workdir: Path) -> list[dict]:
    """Peak RSS of sessa-write-shards over ``megabytes`` (and a third of it) of generated text, as
    .jsonl.zst and as parquet: each run in its own process, its peak (the largest of the
    process and its tokenizer workers, whichever is larger) its own. A peak that does not grow with the input is the
    bounded-memory claim."""
    import multiprocessing

    rows = []
    for size in (megabytes // 3, megabytes):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            zst, parquet = pool.apply(_generated_corpus, (size, workdir / str(size)))
        for path in (zst, parquet):
            cmd = [sys.executable, "-c", "import sys; from sessa_train.data.cli import write_shards_main as m; m()"]
            cmd += ["--input", str(path), "--tokenizer", str(tokenizer), "--out", str(path.with_suffix(".out"))]
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", PEAK_OF, *cmd, "--seq-len", "2048", "--no-progress"],
                                 check=True, capture_output=True, text=True)  # fmt: skip
            rows.append({"input": path.name, "stored_mb": path.stat().st_size / 1e6, "text_mb": size,
                         "seconds": time.perf_counter() - start,
                         "peak_rss_mib": int(out.stdout.split()[-1]) / 1024})  # fmt: skip
    return rows


def _generated_corpus(megabytes: int, folder: Path) -> tuple[Path, Path]:
    """``megabytes`` of random words (7 kB documents) as big.jsonl.zst and big.parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=6)) for _ in range(20000)])
    zst, parquet = folder / "big.jsonl.zst", folder / "big.parquet"
    n_docs = megabytes * 1_000_000 // 7_000
    with open(zst, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as out:
        writer = None
        for start in range(0, n_docs, 5000):
            docs = [" ".join(rng.choice(words, size=1000)) for _ in range(min(5000, n_docs - start))]
            out.write("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
            table = pa.table({"text": docs})
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table, row_group_size=1000)
        writer.close()
    return zst, parquet


def bench_train_step(seq_len: int, micro_batch: int, steps: int) -> dict:
    """Forward + backward + AdamW of the `tiny` preset's model (what the trainer runs on CPU)."""
    torch.manual_seed(0)
    cfg = load_config([TINY_PRESET]).model
    vocab_size = cfg.vocab_size
    model = SessaLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab_size, (micro_batch, seq_len + 1))

    def step() -> None:
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {
        "tokens": steps * micro_batch * seq_len,
        "seconds": seconds,
        "tokens_per_s": steps * micro_batch * seq_len / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data/default"))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--json", type=Path, default=Path("runs/bench_data.json"))
    p.add_argument("--s3", action="store_true", help="add rows loading the shards from S3 on 127.0.0.1 (moto)")
    p.add_argument("--rss", type=int, metavar="MB", help="peak RSS of sessa-write-shards on MB of generated text")
    p.add_argument("--serve-s3", type=int, metavar="PORT", help="serve the shards over S3 on PORT until killed")
    p.add_argument("--load", metavar="PATH", help="only load one epoch from PATH (a folder or a URL)")
    args = p.parse_args()
    if args.load:
        r = bench_load(args.load, args.micro_batch, 0)
        print(f"{args.load}: {r['tokens']} tokens in {r['seconds']:.2f}s, {r['tokens_per_s']:,.0f} tokens/s")
        return
    if args.micro_batch < 1 or args.train_steps < 1:
        p.error(f"--micro-batch and --train-steps must be >= 1, got {args.micro_batch} and {args.train_steps}")
    if not (args.data_dir / "shards" / "index.json").exists():
        prepare_default_data_main(["--out-dir", str(args.data_dir)])
    shards = args.data_dir / "shards"
    if args.serve_s3:
        with s3_with(shards, args.serve_s3) as (endpoint, url):
            print(f"serving {url} at AWS_ENDPOINT_URL={endpoint} (Ctrl-C stops)", flush=True)
            while True:
                time.sleep(3600)
    if args.rss:
        with tempfile.TemporaryDirectory() as work:
            rows = bench_rss(args.rss, args.data_dir / "tokenizer.model", Path(work))
        print("| input | stored MB | text MB | seconds | peak RSS MiB |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['input']} | {r['stored_mb']:.0f} | {r['text_mb']:.0f} | {r['seconds']:.1f} | "
                  f"{r['peak_rss_mib']:.0f} |")  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        return
    index = json.loads((shards / "index.json").read_text())
    seq_len = index["seq_len"]
    rows = {
        f"write shards ({os.cpu_count()} processes)": bench_write(
            args.data_dir / "corpus.jsonl", args.data_dir / "tokenizer.model", seq_len
        ),
        "load, 0 workers": bench_load(shards, args.micro_batch, 0),
        "load, 2 workers": bench_load(shards, args.micro_batch, 2),
    }
    if args.s3:
        with s3_with(shards) as (_, url):
            rows["load from S3 (127.0.0.1), 0 workers"] = bench_load(url, args.micro_batch, 0)
            rows["load from S3 (127.0.0.1), 2 workers"] = bench_load(url, args.micro_batch, 2)
    rows |= {
        f"train step, tiny preset, batch {args.micro_batch}x{seq_len}": bench_train_step(
            seq_len, args.micro_batch, args.train_steps
        ),
    }
    consume = rows[next(k for k in rows if k.startswith("train step"))]["tokens_per_s"]
    print(f"# data pipeline, {os.cpu_count()} cores, torch {torch.__version__}, seq_len {seq_len}")
    print("| what | tokens | seconds | tokens/s | x training consumption |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / consume:.1f}x |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
