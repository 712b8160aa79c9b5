"""Benchmark the cache reader: samples/s and MB/s through a DataLoader with 0 / 2 / 4 workers.

    python bench/loader.py                         # reduced shapes, ~20-40 s on a CPU
    python bench/loader.py --shapes real           # 729 visual + 128 text tokens, k = 64,
                                                   # Qwen2.5-3B hidden states (2048, bf16)
    python bench/loader.py --cache caches/t.zarr   # an existing cache
    python bench/loader.py --need 64               # the training side's consumption, samples/s

What is timed: one pass over every sample of ``kdcache.cache.reader.CacheDataset`` (the trainer's
order: shuffled blocks of ``--block-size`` samples, each block one slab read per array, sample
checksums verified as in training) through ``torch.utils.data.DataLoader`` with ``batch_size``
``--batch-size`` and the given workers, the batch's records packed and checked in the worker as
the trainer does (``packed``; ``per-record`` rows show the unpacked transfer for comparison),
records only (no images, no tokenisation: those cost the same with or without a cache). MB/s counts the bytes the cache holds on disk for the samples
read (compressed, what the disk delivers) and the decoded bytes of the records (what the
trainer receives). ``x need`` is samples/s over ``--need``: below 1 the trainer would wait for
data. The default need, 64 samples/s, is e.g. 8 GPUs each taking a batch of 8 every second.

The synthetic cache is written by the real writer from records with random (valid) top-k
log-probs; its compressed size is therefore pessimistic (random ids compress worse than a
trained teacher's).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kdcache.cache.format import make_attrs
from kdcache.cache.reader import CacheDataset, CacheReader
from kdcache.cache.writer import CacheWriter
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL, select_positions
from kdcache.records import TeacherRecord
from kdcache.train import check_packed_records, pack_records, unpack_records

SHAPES = {  # visual tokens, text tokens, k, hidden size, vocab, samples
    "reduced": (144, 64, 64, 256, 16384, 768),
    "real": (729, 128, 64, 2048, 151936, 512),
}


def synthetic_cache(path: Path, n_vis: int, n_text: int, k: int, D: int, V: int, n: int) -> Path:
    """Write ``n`` records of [prompt | image | prompt | response] with the real writer."""
    teacher = {"name_or_path": "bench", "config_hash": "0", "vocab_size": V, "hidden_size": D,
               "dtype": "bfloat16", "num_image_tokens": n_vis}
    tokenizer = {"name_or_path": "bench", "vocab_hash": "0", "template": "chat", "template_hash": "0"}
    dataset = {"path": "bench.json", "num_rows": n, "sha256": "0" * 64}
    settings = {"top_k": k, "positions": ["visual", "response"], "logprob_dtype": "float16", "hidden": "bf16",
                "temperature": 1.0, "relation": "hidden", "max_length": n_vis + n_text + 8, "world_size": 1,
                "targets": "topk"}
    w = CacheWriter(path, make_attrs(teacher, tokenizer, dataset, settings), rank=0, world_size=1)
    rng = np.random.default_rng(0)
    pre, mid = n_text // 8, n_text // 8
    roles = np.concatenate([np.full(pre, ROLE_PROMPT), np.full(n_vis, ROLE_VISUAL), np.full(mid, ROLE_PROMPT),
                            np.full(n_text - pre - mid, ROLE_RESPONSE)]).astype(np.uint8)
    pos, kinds = select_positions(roles, ("visual", "response"))
    P = len(pos)
    for row in range(n):
        # descending log-probs of a peaked distribution, ids distinct per row, the exact tail
        lp = np.sort(-rng.exponential(2.0, size=(P, k)).cumsum(axis=1) * 0.3, axis=1)[:, ::-1]
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True) / 0.95)
        ids = np.stack([rng.choice(V, size=k, replace=False) for _ in range(P)]).astype(np.int32)
        w.add(TeacherRecord(
            sample_id=f"b-{row:06d}", row=row, input_ids=torch.from_numpy(rng.integers(0, V, len(roles)).astype(np.int32)),
            roles=torch.from_numpy(roles), positions=torch.from_numpy(pos), kinds=torch.from_numpy(kinds),
            topk_ids=torch.from_numpy(ids), topk_logprobs=torch.from_numpy(lp.astype(np.float32)),
            tail_logmass=torch.full((P,), float(np.log(0.05)), dtype=torch.float32),
            visual_hidden=torch.randn(n_vis, D, dtype=torch.bfloat16)))
    w.write_gram(np.eye(D, dtype=np.float32))
    w.close(finished=True)
    return path


def record_bytes(r: TeacherRecord) -> int:
    ts = [r.input_ids, r.roles, r.positions, r.kinds, r.topk_ids, r.topk_logprobs, r.tail_logmass]
    if r.visual_hidden is not None:
        ts.append(r.visual_hidden)
    return sum(t.numel() * t.element_size() for t in ts)


def _keep(items):
    return items  # a list of records: no collation (module level: picklable for workers)


def _pack_and_check(items, vocab_size: int):
    """What the trainer's workers do with a batch's records: pack them, then check them
    (``kdcache.train.check_packed_records``: ids in range, values finite)."""
    packed = pack_records(items)
    check_packed_records(packed, vocab_size, None)
    return packed


def measure(path: Path, workers: int, batch_size: int, block_size: int, packed: bool) -> dict:
    """One full pass: time to the first batch (worker start, index load, first block) and the
    steady rate after it. ``packed``: the trainer's transfer (``pack_records`` and
    ``check_packed_records`` in the worker, ``unpack_records`` here); else a list of records,
    8 tensors each."""
    ds = CacheDataset(path, seed=0, epoch=0, block_size=block_size, batch_size=batch_size)
    V = int(CacheReader(path, check=False).attrs["teacher"]["vocab_size"])
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                     collate_fn=partial(_pack_and_check, vocab_size=V) if packed else _keep,
                                     prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    n = nbytes = 0
    t_first = n_first = None
    for batch in dl:
        batch = unpack_records(batch) if packed else batch
        n += len(batch)
        nbytes += sum(record_bytes(r) for r in batch)
        if t_first is None:
            t_first, n_first = time.perf_counter() - t0, n
    total = time.perf_counter() - t0
    return {"first": t_first, "total": total, "n": n, "bytes": nbytes,
            "steady": (n - n_first) / max(total - t_first, 1e-9)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None, help="an existing cache (default: write a synthetic one)")
    ap.add_argument("--shapes", default="reduced", choices=list(SHAPES))
    ap.add_argument("--samples", type=int, default=None, help="synthetic samples to write")
    ap.add_argument("--workers", default="0,2,4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--need", type=float, default=64.0, help="consumption rate to compare with, samples/s")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on 2 cores: measured anyway

    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            path = Path(args.cache)
            what = str(path)
        else:
            n_vis, n_text, k, D, V, n = SHAPES[args.shapes]
            n = args.samples or n
            t0 = time.perf_counter()
            path = synthetic_cache(Path(tmp) / "bench.zarr", n_vis, n_text, k, D, V, n)
            what = (f"synthetic {args.shapes}: {n} samples of {n_vis} visual + {n_text} text tokens, k={k}, "
                    f"bf16 hidden {D} (written in {time.perf_counter() - t0:.1f} s)")
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        N = CacheReader(path).num_samples
        print(f"\ncache {what}\n{N} samples, {disk / 2**20:.1f} MiB on disk ({disk / N / 1024:.1f} KiB/sample), "
              f"batch {args.batch_size}, block {args.block_size}, need {args.need:g} samples/s")
        print(f"{'workers':>7} {'transfer':>10} {'1st batch s':>11} {'samples/s':>10} {'steady/s':>9} {'disk MB/s':>10} "
              f"{'decoded MB/s':>13} {'x need':>7}")
        measure(path, 0, args.batch_size, args.block_size, True)  # warm the page cache once
        runs = [(int(x), True) for x in args.workers.split(",")] + [(int(x), False) for x in args.workers.split(",") if int(x)]
        for w, packed in runs:
            m = measure(path, w, args.batch_size, args.block_size, packed)
            rate = m["n"] / m["total"]
            print(f"{w:>7} {'packed' if packed else 'per-record':>10} {m['first']:>11.2f} {rate:>10.1f} {m['steady']:>9.1f} {disk / N * m['steady'] / 1e6:>10.1f} "
                  f"{m['bytes'] / m['n'] * m['steady'] / 1e6:>13.1f} {m['steady'] / args.need:>7.2f}")
        print("steady = after the first batch; MB/s and x need at the steady rate. Each (rank, worker) decodes "
              "only its own samples' hidden states; the narrow arrays of a block are read once per worker.")


if __name__ == "__main__":
    main()
