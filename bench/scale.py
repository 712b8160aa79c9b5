"""How the costs before and around the GPU grow with the dataset: 1k -> 10k -> 100k (-> 665k) samples.

    python bench/scale.py                                   # sizes 1000,10000 (a CPU, ~2 min)
    python bench/scale.py --sizes 1000,10000,100000         # ~15 min on 2 cores
    python bench/scale.py --sizes 665000 --work /big/disk   # by hand: LLaVA-mix-665k's sample count

The test of scale is the sample count, not image decoding: every size's LLaVA JSON points at the
same four small PNGs (in subfolders), with LLaVA-mix-665k's row kinds (single- and multi-turn,
``<image>`` before or after the question, ~6% text-only rows, numeric and string ids). The student
is the tiny preset (16 visual tokens) with the synthetic dataset's tokenizer. The cache for a size
is written through the real ``CacheWriter`` from the student's own tokenisation of that JSON (so the
trainer's per-sample check passes), with random valid top-k (k = 4) log-probs and random bf16
visual hidden states instead of a teacher forward (a teacher forward costs the same per sample at
any size, and is what ``bench/dump.py`` measures); its attributes are the dump's fingerprints of the
student as teacher.

Every row runs in a fresh process, so its peak resident memory is its own: ``RSS`` is the peak
(``ru_maxrss``, the process and its DataLoader workers) minus the process's RSS after its imports.
Rows, per size:
    prepare serial       read + parse the JSON, tokenise and check every image header in one process:
                         what dump and train did before the GPU started
    prepare parallel     the same over ``--workers`` processes (``kdcache.data.collate.prepare``)
    dump first batch     from reading the JSON to the first collated batch the teacher would get, the
                         dump's own data path: its up-front ``prepare_samples`` over ``--workers``
                         processes, or ``kdcache.dump.window_loader`` where a checkout streams windows
    cache open + order   open the cache (index of every part) and build the epoch order
    first batch          ... and draw the first batch through a DataLoader (0 workers)
    resume at N-1        the same from sample N-1 of the epoch (mid-epoch resume)
    verify               ``kdcache verify`` over every sample
    export               ``kdcache export`` to Parquet (one row per distilled position)
    train data setup     the trainer's data path until it can serve samples (``training_data``: the
                         JSON, one pass over ``--workers`` processes to find the usable rows)
    train check / sample the per-sample path in a loader worker: tokenise, compare with the cached
                         ids, load and preprocess the (64 px) image

``per sample`` is the row's time over the size's sample count (for resume and first batch, the time
itself: it must not grow). Machine notes go in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = ("prepare serial", "prepare parallel", "dump first batch", "cache open + order", "first batch",
        "resume at N-1", "verify", "export", "train data setup", "train check / sample")
K = 4  # top-k of the synthetic caches
IMAGES = ("coco/train2017/000000000001.png", "coco/train2017/000000000002.png", "gqa/images/3.png",
          "ocr_vqa/images/4.png")

QA = [("What colour is the circle?", "red"), ("What shape is the red object?", "circle"),
      ("How many objects are there?", "2"), ("Where is the red circle?", "top left"),
      ("Is there a blue square?", "no"),
      ("Describe the picture in detail.", "There is a red circle in the top left and a blue square at the "
       "bottom right of a white background. The circle is larger than the square.")]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """Peak RSS of this process (VmHWM: ``ru_maxrss`` would carry the launcher's over exec) or of
    its largest waited-for child (pool and DataLoader workers), MB."""
    with open("/proc/self/status") as f:
        own = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


# ---- inputs ----------------------------------------------------------------------------------
def setup_work(work: Path) -> dict:
    """Once per work folder: the tokenizer and four shared images (the synthetic dataset's), the
    tiny student."""
    from kdcache.data.synthetic import make_synthetic
    from kdcache.models import init_model

    paths = {"synth": work / "synth", "images": work / "images", "student": work / "student"}
    if not (paths["student"] / "config.json").is_file():
        syn = make_synthetic(paths["synth"], num_images=len(IMAGES), qa_per_image=2, num_val=0, num_eval=0,
                             seed=0, num_text_only=2)
        for i, rel in enumerate(IMAGES):
            (paths["images"] / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(syn["images_root"] / f"train_{i:06d}.png", paths["images"] / rel)
        init_model(paths["student"], preset="tiny-student", tokenizer=str(syn["tokenizer"]))
    return paths


def make_json(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` LLaVA rows with the real datasets' row kinds, all on the four shared images."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.random()
        turns = rng.choice((1, 1, 2, 3))
        qa = [rng.choice(QA) for _ in range(turns)]
        conv = []
        for j, (q, a) in enumerate(qa):
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        sid = i if i % 3 == 0 else f"{i:012d}"  # numeric and string ids
        row = {"id": sid, "model": ""} if kind < 0.06 else {"id": sid, "image": IMAGES[i % len(IMAGES)]}
        if kind >= 0.06:  # <image> before (LLaVA's usual) or after the question
            first = conv[0]["value"]
            conv[0]["value"] = f"{first}\n<image>" if kind < 0.2 else f"<image>\n{first}"
        row["conversations"] = conv
        rows.append(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.rename(path)
    return path


def _student(paths):
    from kdcache.models import load_model

    model, processor = load_model(str(paths["student"]))
    return model, processor


def _prepare_kwargs(model, processor, images: Path) -> dict:
    from kdcache.models import image_token_id, num_image_tokens

    return dict(template="chat", image_token_id=image_token_id(model.config),
                num_image_tokens=num_image_tokens(model.config, processor), max_length=2048,
                images_root=images)


def make_cache(out: Path, data: Path, paths: dict, workers: int) -> Path:
    """The cache of ``data`` through the real writer (see the module docstring)."""
    import numpy as np
    import torch

    from kdcache.cache.format import make_attrs
    from kdcache.cache.writer import CacheWriter, cache_finished
    from kdcache.config import DumpConfig
    from kdcache.data.collate import prepare
    from kdcache.data.llava import read_llava_json
    from kdcache.dump import fingerprints
    from kdcache.positions import select_positions
    from kdcache.records import TeacherRecord

    if cache_finished(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    model, processor = _student(paths)
    kw = _prepare_kwargs(model, processor, paths["images"])
    samples = read_llava_json(data)
    cfg = DumpConfig(teacher=str(paths["student"]), data=str(data), images=str(paths["images"]), out=str(out),
                     top_k=K, hidden="bf16")
    attrs = make_attrs(*fingerprints(cfg, model, processor, kw["num_image_tokens"], len(samples), 1))
    V, D = int(model.lm_head.weight.shape[0]), int(model.lm_head.weight.shape[1])
    rng = np.random.default_rng(0)
    w = CacheWriter(out, attrs)
    w.write_gram(np.eye(D, dtype=np.float32))
    n_skipped = 0
    for t in _tokenised(samples, processor.tokenizer, kw, workers):
        pos, kinds = select_positions(t.roles, tuple(cfg.positions))
        P = len(pos)
        lp = -np.sort(rng.exponential(1.0, size=(P, K)), axis=1)  # descending
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True) / 0.95)  # head holds 0.95 of the mass
        ids = np.argsort(rng.random((P, V)), axis=1)[:, :K].astype(np.int32)  # distinct per row
        n_vis = int((t.roles == 1).sum()) if t.has_image else 0
        rec = TeacherRecord(sample_id=t.sample_id, row=t.row, input_ids=torch.from_numpy(t.input_ids),
                            roles=torch.from_numpy(t.roles), positions=torch.from_numpy(pos),
                            kinds=torch.from_numpy(kinds), topk_ids=torch.from_numpy(ids),
                            topk_logprobs=torch.from_numpy(lp.astype(np.float32)),
                            tail_logmass=torch.full((P,), float(np.log(0.05))),
                            visual_hidden=torch.randn(n_vis, D).to(torch.bfloat16))
        try:
            w.add(rec)
        except TypeError:  # a checkout whose checksum cannot take a text-only row (issue 15, part 1)
            w.skip(t.row, t.sample_id, "other")
            n_skipped += 1
    w.close(finished=True)
    if n_skipped:
        print(f"<!-- {out.name}: {n_skipped} text-only rows written as skipped (this checkout cannot store them) -->",
              file=sys.stderr)
    return out


def _tokenised(samples, tokenizer, kw: dict, workers: int, chunk: int = 20000):
    """Every sample's Tokenized, ``chunk`` samples at a time (memory bounded at any size)."""
    from kdcache.data.collate import prepare

    for s in range(0, len(samples), chunk):
        kept, toks, skipped = prepare(samples[s:s + chunk], tokenizer, **kw, **_workers_kw(workers))
        assert not skipped.total, skipped.summary()
        yield from toks


def _workers_kw(workers: int) -> dict:
    """``prepare``'s process count, where this checkout's ``prepare`` takes one."""
    import inspect

    from kdcache.data.collate import prepare

    return {"num_proc": workers} if "num_proc" in inspect.signature(prepare).parameters else {}


# ---- rows (each in its own process) ----------------------------------------------------------
def row_prepare(paths, data, cache, n, workers):
    from kdcache.data.collate import prepare
    from kdcache.data.llava import read_llava_json

    model, processor = _student(paths)
    kw = _prepare_kwargs(model, processor, paths["images"])
    base = rss_mb()
    t0 = time.perf_counter()
    samples = read_llava_json(data)
    kept, toks, skipped = prepare(samples, processor.tokenizer, **kw, **_workers_kw(workers))
    dt = time.perf_counter() - t0
    assert len(kept) == n, (len(kept), skipped.summary())
    return {"s": dt, "base": base}


def row_dump_first_batch(paths, data, cache, n, workers):
    from kdcache.config import DumpConfig
    from kdcache import dump as D

    model, processor = _student(paths)
    cfg = DumpConfig(teacher=str(paths["student"]), data=str(data), images=str(paths["images"]),
                     out=str(cache.parent / "unused.zarr"), top_k=K, num_workers=workers, batch_size=8)
    from kdcache.data.llava import read_llava_json
    from kdcache.models import num_image_tokens

    base = rss_mb()
    t0 = time.perf_counter()
    samples = read_llava_json(data)
    W = cfg.batch_size * cfg.bucket_batches
    windows = [samples[a:a + W] for a in range(0, len(samples), W)]
    if not hasattr(D, "window_loader"):  # the dump tokenises the rank's every sample before its first batch
        from kdcache.data.collate import prepare_samples

        kw = _prepare_kwargs(model, processor, paths["images"])
        prepare_samples(samples, processor.tokenizer, on_too_long="skip", num_proc=workers, **kw)
        return {"s": time.perf_counter() - t0, "base": base, "per_sample": False,
                "note": "up-front prepare_samples over --workers processes"}
    loader = D.window_loader(cfg, processor, model.config, windows, num_image_tokens(model.config, processor))
    first = next(iter(loader))["batches"][0]
    dt = time.perf_counter() - t0
    assert first["input_ids"].shape[0] == cfg.batch_size
    return {"s": dt, "base": base, "per_sample": False}


def row_open_order(paths, data, cache, n, workers, start=None, batch=False):
    import torch

    import zarr  # noqa: F401  (imported before the clock starts: a fixed cost, not the cache's)

    from kdcache.cache.reader import CacheDataset, CacheReader

    if start == -1:  # the last sample of the epoch
        start = CacheReader(cache).num_samples - 1
    base = rss_mb()
    t0 = time.perf_counter()
    ds = CacheDataset(str(cache), seed=0, epoch=0, block_size=64,
                      start_sample=0 if start is None else start, batch_size=8)
    if batch:
        dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0, collate_fn=list)
        first = next(iter(dl))
        assert len(first) == (8 if start is None else 1)
    else:
        assert len(ds) >= 0.9 * n  # every ok sample (text-only ones skipped on a checkout that cannot store them)
    return {"s": time.perf_counter() - t0, "base": base, "per_sample": not batch}


def row_verify(paths, data, cache, n, workers):
    import zarr  # noqa: F401

    from kdcache.cache.verify import verify_cache

    base = rss_mb()
    t0 = time.perf_counter()
    rep = verify_cache(cache)
    dt = time.perf_counter() - t0
    assert rep.ok and rep.samples_checked >= 0.9 * n, str(rep)[:2000]
    return {"s": dt, "base": base}


def row_export(paths, data, cache, n, workers):
    import zarr  # noqa: F401

    from kdcache.cache.arrow import export_parquet

    out = cache.parent / f"export-{n}.parquet"
    base = rss_mb()
    t0 = time.perf_counter()
    rows = export_parquet(cache, out)
    dt = time.perf_counter() - t0
    size = out.stat().st_size
    out.unlink()
    return {"s": dt, "base": base, "rows": rows, "parquet_mb": size / 2**20}


def row_train_setup(paths, data, cache, n, workers, check_only=False):
    """The trainer's data path (``kdcache.train.training_data`` when this checkout has it) until
    it can serve samples; ``check_only``: the per-sample path (tokenise, compare with the record,
    load the image) over 512 records, timed alone."""
    import numpy as np
    import torch

    from kdcache import train as T
    from kdcache.cache.reader import CacheReader
    from kdcache.config import TrainConfig

    model, processor = _student(paths)
    cfg = TrainConfig(stage="dft", student=str(paths["student"]), data=str(data), images=str(paths["images"]),
                      cache=str(cache), out=str(cache.parent / "unused-run"), num_workers=workers)
    base = rss_mb()
    t0 = time.perf_counter()
    if hasattr(T, "training_data"):
        join = T.training_data(cfg, processor, model.config).join
    else:  # this checkout's train(): prepare_samples up front, then a SampleJoin
        from kdcache.data.collate import LlavaTorchDataset, prepare_samples
        from kdcache.data.llava import read_llava_json

        kw = _prepare_kwargs(model, processor, paths["images"])
        kw.pop("images_root")
        kept, toks, _ = prepare_samples(read_llava_json(cfg.data), processor.tokenizer, images_root=cfg.images,
                                        on_too_long="skip", **kw)
        join = T.SampleJoin(LlavaTorchDataset.from_prepared(kept, toks, processor.image_processor, cfg.images))
    reader = CacheReader(cache)
    p = reader.parts[0]
    setup = time.perf_counter() - t0
    m = min(512, n)
    recs = reader.read_rows(p, p.ok[np.arange(m)])
    t1 = time.perf_counter()
    items = [join(r) for r in recs]
    check = time.perf_counter() - t1
    assert all(torch.equal(it["input_ids"], r.input_ids.long()) for it, r in zip(items, recs))
    if check_only:
        return {"s": check / m, "base": base, "per_sample": False, "note": f"mean over {m} records"}
    return {"s": setup, "base": base}


ROW_FUNCS = {
    "make cache": lambda p, d, c, n, w: {"s": make_cache(c, d, p, w) and 0.0, "base": 0.0},
    "prepare serial": lambda *a: row_prepare(*a[:4], 1),
    "prepare parallel": row_prepare,
    "dump first batch": row_dump_first_batch,
    "cache open + order": row_open_order,
    "first batch": lambda *a: row_open_order(*a, batch=True),
    "resume at N-1": lambda p, d, c, n, w: row_open_order(p, d, c, n, w, start=-1, batch=True),
    "verify": row_verify,
    "export": row_export,
    "train data setup": row_train_setup,
    "train check / sample": lambda *a: row_train_setup(*a, check_only=True),
}


def child(args) -> None:
    paths = setup_work(args.work)
    n = args.size
    out = ROW_FUNCS[args.child](paths, args.work / f"data-{n}.json", args.work / f"cache-{n}.zarr", n,
                                args.workers)
    out["peak"] = peak_mb()
    print("RESULT " + json.dumps(out))


# ---- driver ----------------------------------------------------------------------------------
def run_row(args, name: str, n: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--size", str(n),
           "--work", str(args.work), "--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[:300], "wall": wall}
    res = json.loads(line[len("RESULT "):])
    res["wall"] = wall
    return res


def fmt_row(name: str, n: int, r: dict) -> str:
    if "error" in r:
        return f"| {name} | {n:,} | failed: {r['error']} | | | |"
    if r.get("s") is None:
        return f"| {name} | {n:,} | not run: {r.get('note', '')} | | | |"
    per = r.get("per_sample", True)
    cost = f"{1e6 * r['s'] / n:,.1f} us" if per else f"{1e3 * r['s']:,.1f} ms"  # not per sample: the time itself
    extra = []
    if "rows" in r:
        extra.append(f"{r['rows'] / r['s']:,.0f} rows/s, {r['rows']:,} rows, {r['parquet_mb']:.1f} MB")
    elif per:
        extra.append(f"{n / r['s']:,.0f} samples/s")
    if r.get("note"):
        extra.append(r["note"])
    return (f"| {name} | {n:,} | {r['s']:,.3f} s | {cost} | {max(0.0, r['peak'] - r['base']):,.0f} MB "
            f"(peak {r['peak']:,.0f}) | {'; '.join(extra)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated sample counts")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdcache-scale"),
                    help="folder for the JSONs and caches (kept between runs: each is made once)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the parallel rows and loaders")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--json", type=Path, default=None, help="write every raw number here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    paths = setup_work(args.work)
    raw = {}
    print(f"| row | samples | time | per sample | RSS over baseline | |\n| --- | --- | --- | --- | --- | --- |",
          flush=True)
    for n in sizes:
        t0 = time.perf_counter()
        data = make_json(args.work / f"data-{n}.json", n)
        r = run_row(args, "make cache", n)  # in its own process: the driver stays small
        if "error" in r:
            raise SystemExit(f"making the cache of {n} samples failed: {r['error']}")
        print(f"<!-- size {n:,}: inputs ready in {time.perf_counter() - t0:.1f} s -->", file=sys.stderr,
              flush=True)
        for name in rows:
            r = run_row(args, name, n)
            raw[f"{name}@{n}"] = r
            print(fmt_row(name, n, r), flush=True)
            if args.json:
                args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
