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
import json
import os
import tempfile
import warnings
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import _report
from kdcache.cache.format import make_attrs
from kdcache.cache.reader import CacheDataset, CacheReader
from kdcache.cache.writer import CacheWriter
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL, select_positions
from kdcache.records import TeacherRecord
from kdcache.train import check_packed_records, pack_records, unpack_records

SHAPES = {  # visual tokens, text tokens, k, hidden size, vocab, samples
    "reduced": (144, 64, 64, 256, 16384, 768),
    "real": (729, 128, 64, 2048, 151936, 512),
    "real-thin": (729, 128, 64, 2048, 151936, 48),  # the real record shapes, few samples: a CPU check
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


def paced(path: Path, workers: int, batch_size: int, block_size: int, step_s: float, device: torch.device,
          max_steps: int) -> dict:
    """The trainer's loop with the step replaced by a busy host: DataLoader (packed and checked
    in the workers, pinned on CUDA), ``unpack_records`` + ``to_device`` as the trainer does, then
    ``step_s`` of Python spinning, which holds the interpreter as a host launching a step's
    kernels would (a stricter stand-in than sleeping). Data wait = the time spent in
    ``next(loader)`` after the first batch over the wall time after it (the first batch, worker
    start and the first block, is paid once per epoch and reported apart)."""
    from kdcache.train import to_device

    ds = CacheDataset(path, seed=0, epoch=0, block_size=block_size, batch_size=batch_size)
    V = int(CacheReader(path, check=False).attrs["teacher"]["vocab_size"])
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                     collate_fn=partial(_pack_and_check, vocab_size=V),
                                     prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda")
    it = iter(dl)
    t0 = time.perf_counter()
    first = None
    wait = 0.0
    n = steps = 0
    while steps < max_steps:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        if first is None:
            first = time.perf_counter() - t0
            t_steady = time.perf_counter()
        else:
            wait += time.perf_counter() - t
        recs = unpack_records(to_device(batch, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        n += len(recs)
        steps += 1
        end = time.perf_counter() + step_s
        while time.perf_counter() < end:  # the step: the host busy
            pass
    total = time.perf_counter() - t_steady
    del it  # the workers of a loop stopped early
    return {"first": first, "steady_wall": total, "wait": wait, "data_wait": wait / max(total, 1e-9), "n": n,
            "steps": steps}


def pace_from(path: Path | None) -> tuple[float, int, str] | None:
    """(step seconds, batch, source) of the cached KD step in a ``train_step.py --json`` report."""
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    row = next((r for r in data.get("rows", []) if r.get("key") == "cached KD"), None)
    if row is None:
        return None
    return float(row["time"]), int(data["meta"]["batch"]), f"the cached KD step of {path.name} ({data['meta'].get('gpu')})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None, help="an existing cache (default: write a synthetic one)")
    ap.add_argument("--shapes", default="reduced", choices=list(SHAPES))
    ap.add_argument("--samples", type=int, default=None, help="synthetic samples to write")
    ap.add_argument("--workers", default="0,2,4")
    ap.add_argument("--per-record", action=argparse.BooleanOptionalAction, default=True,
                    help="also the unpacked (per-record) transfer rows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--need", type=float, default=64.0, help="consumption rate to compare with, samples/s "
                    "(replaced by the measured step's with --pace-from)")
    ap.add_argument("--pace-from", type=Path, default=None,
                    help="a train_step.py --json report: the need is its cached KD step's batch / time, and a "
                         "paced row measures the data wait at that step time")
    ap.add_argument("--pace-ms", type=float, default=None, help="the step time of the paced row, ms (instead of "
                    "--pace-from)")
    ap.add_argument("--pace-workers", type=int, default=4)
    ap.add_argument("--pace-steps", type=int, default=24, help="at most this many paced steps")
    ap.add_argument("--device", default="auto", help="where the paced row copies the batches: auto | cpu | cuda")
    _report.add_args(ap)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on 2 cores: measured anyway
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rep = _report.Report(args, "loader")

    pace = pace_from(args.pace_from)
    if pace is not None:
        step_s, B_step, source = pace
        need = B_step / step_s
    elif args.pace_ms:
        step_s, source, need = args.pace_ms / 1e3, f"--pace-ms {args.pace_ms:g}", args.batch_size / (args.pace_ms / 1e3)
    else:
        step_s, source, need = None, f"--need {args.need:g}", args.need
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            path = Path(args.cache)
            what = str(path)
            write_s = None
        else:
            n_vis, n_text, k, D, V, n = SHAPES[args.shapes]
            n = args.samples or n
            t0 = time.perf_counter()
            path = synthetic_cache(Path(tmp) / "bench.zarr", n_vis, n_text, k, D, V, n)
            write_s = time.perf_counter() - t0
            what = (f"synthetic {args.shapes}: {n} samples of {n_vis} visual + {n_text} text tokens, k={k}, "
                    f"bf16 hidden {D} (written in {write_s:.1f} s)")
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        N = CacheReader(path).num_samples
        head = (f"cache {what}; {N} samples, {disk / 2**20:.1f} MiB on disk ({disk / N / 1024:.1f} KiB/sample), "
                f"batch {args.batch_size}, block {args.block_size}; need {need:.1f} samples/s ({source})")
        rep.meta(cache=what, samples=N, disk_bytes=disk, batch=args.batch_size, block=args.block_size, need=need,
                 need_source=source, write_s=write_s, device=str(device), cpus=os.cpu_count())
        t_pass = None  # the longest pass so far: the unit of the estimates
        if args.cache:  # a synthetic cache was just written: its files are in the page cache already
            rep.doing("warming the page cache")
            t0 = time.perf_counter()
            measure(path, 0, args.batch_size, args.block_size, True)
            t_pass = time.perf_counter() - t0
        runs = [(int(x), True) for x in args.workers.split(",")]
        if args.per_record:
            runs += [(int(x), False) for x in args.workers.split(",") if int(x)]
        cells = []
        for w, packed in runs:
            name = f"{w} workers, {'packed' if packed else 'per-record'}"
            if t_pass is not None and not rep.fits(t_pass * 1.3 + 2):
                rep.skip(name, f"table budget: {rep.left():.0f} s left")
                cells.append([str(w), "packed" if packed else "per-record", "not run", "", "", "", "", "", ""])
                continue
            rep.doing(name)
            t0 = time.perf_counter()
            m = measure(path, w, args.batch_size, args.block_size, packed)
            t_pass = max(t_pass or 0.0, time.perf_counter() - t0)
            rate = m["n"] / m["total"]
            row = {"workers": w, "transfer": "packed" if packed else "per-record", "first_batch_s": m["first"],
                   "samples/s": rate, "steady/s": m["steady"], "disk_MB/s": disk / N * m["steady"] / 1e6,
                   "decoded_MB/s": m["bytes"] / m["n"] * m["steady"] / 1e6, "x_need": m["steady"] / need}
            rep.row(row)
            cells.append([str(w), row["transfer"], f"{m['first']:.2f}", f"{rate:.1f}", f"{m['steady']:.1f}",
                          f"{row['disk_MB/s']:.1f}", f"{row['decoded_MB/s']:.1f}", f"{row['x_need']:.2f}", ""])
            rep.render(head + "\n\n" + _table(cells), [])
        wait_line = None
        if step_s is not None:
            name = f"{args.pace_workers} workers, paced at {step_s * 1e3:.0f} ms/step"
            n_steps = min(args.pace_steps, N // args.batch_size)
            est = n_steps * step_s + (t_pass or 0.0) * 0.5 + 2
            if rep.fits(est):
                rep.doing(name)
                p = paced(path, args.pace_workers, args.batch_size, args.block_size, step_s, device, n_steps)
                rep.row({"workers": args.pace_workers, "transfer": "packed, paced", "step_s": step_s, **p})
                cells.append([str(args.pace_workers), f"paced {step_s * 1e3:.0f} ms", f"{p['first']:.2f}",
                              f"{p['n'] / (p['first'] + p['steady_wall']):.1f}", "", "", "", "",
                              f"{100 * p['data_wait']:.2f}%"])
                wait_line = (f"loader data wait with {args.pace_workers} workers at the {step_s * 1e3:.0f} ms step: "
                             f"{100 * p['data_wait']:.2f}% of step time over {p['steps'] - 1} steps (< 2%: "
                             f"{_report.verdict(p['data_wait'] < 0.02)}); first batch {p['first']:.2f} s")
            else:
                rep.skip(name, f"table budget: {rep.left():.0f} s left, ~{est:.0f} s needed")
                cells.append([str(args.pace_workers), "paced", "not run", "", "", "", "", "", ""])
        summary = []
        best = max((r for r in rep.data["rows"] if r["transfer"] == "packed" and r["workers"] == max(
            (x for x, _ in runs), default=0)), key=lambda r: r["steady/s"], default=None)
        if best is not None:
            summary.append(f"loader {best['workers']} workers: {best['steady/s']:.0f} samples/s = {best['x_need']:.2f}x "
                           f"the need of {need:.1f}/s ({source}; >= 3x: {_report.verdict(best['x_need'] >= 3)})")
        if wait_line:
            summary.append(wait_line)
        md = head + "\n\n" + _table(cells) + ("\n\nsteady = after the first batch; MB/s and x need at the steady "
                                               "rate. Each (rank, worker) decodes only its own samples' hidden states.")
        rep.render(md, summary)
        print("\n" + md + "\n" + "\n".join(summary))
    rep.finish()


def _table(cells):
    return _report.md_table(["workers", "transfer", "1st batch s", "samples/s", "steady/s", "disk MB/s",
                             "decoded MB/s", "x need", "data wait"], cells)


if __name__ == "__main__":
    main()
