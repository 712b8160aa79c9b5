"""Benchmark a cache on object storage: the loader from a local S3 server, writes to it, and the two stores.

    python bench/remote.py                      # reduced shapes, ~1-2 min on a 2-core CPU
    python bench/remote.py --samples 384 --workers 0,4 --need 64

The server is moto's ``ThreadedMotoServer`` on 127.0.0.1 (an ephemeral port) in a child process,
the cache the synthetic one of ``bench/loader.py`` (the real writer, random valid records),
written locally and uploaded with s3fs ``put``. Requests are counted at the server (every HTTP
request it answers, all worker processes included), so "req/sample" is what an object store
would bill.

Tables (rows side by side in one run):
  loader  one pass of ``CacheDataset`` through a DataLoader (records packed and checked in the
          workers, as the trainer does): local directory; ``s3://`` with zarr's own reads (one
          range GET per inner chunk of a shard: kdcache's reader before ``WholeObjectStore``);
          ``s3://`` with whole-object reads + read-ahead (the default); with ``--cache-dir``, first
          and second epoch. samples/s, requests per sample, MB/s of the cache's stored bytes, and
          the multiple of ``--need``.
  write   the writer alone (``CacheWriter.add`` of the same records, default layout), local
          directory against ``s3://``: samples/s and MB/s.
  stores  the whole ``topk_ids`` array read through zarr's ``FsspecStore`` (s3fs) and
          ``ObjectStore`` (obstore, if installed): seconds, MB/s, requests.
A localhost server has no network latency or bandwidth limit: the request counts carry over to
a real bucket, the rates are an upper bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loader as L  # noqa: E402  (bench/loader.py: the synthetic cache and the packed transfer)

SHAPES = {"reduced": (144, 64, 64, 256, 16384), "real-thin": (729, 128, 64, 2048, 151936)}


class _Requests(logging.Handler):
    """Counts the HTTP requests the server answers (werkzeug logs one line per request) into a
    shared counter."""

    def __init__(self, value):
        super().__init__(logging.INFO)
        self.value = value

    def emit(self, record):
        with self.value.get_lock():
            self.value.value += 1


def _serve(port, count, stop) -> None:
    """Child process: the moto server (its own interpreter, so serving does not take the GIL of
    the process being measured, as a real store would not)."""
    from moto.server import ThreadedMotoServer

    log = logging.getLogger("werkzeug")
    log.handlers[:] = [_Requests(count)]
    log.setLevel(logging.INFO)
    log.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port.value = server.get_host_and_port()[1]
    stop.wait()
    server.stop()


class Server:
    """moto's ThreadedMotoServer on 127.0.0.1:0 in a child process; ``n`` = requests answered."""

    def __init__(self):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._port, self._count, self._stop = ctx.Value("i", 0), ctx.Value("l", 0), ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(self._port, self._count, self._stop), daemon=True)
        self._proc.start()
        while not self._port.value:
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{self._port.value}"

    @property
    def n(self) -> int:
        return self._count.value

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)


def one_pass(cache, workers: int, batch_size: int, block_size: int, cache_dir=None) -> tuple[int, float]:
    from kdcache.cache.reader import CacheDataset, CacheReader

    ds = CacheDataset(cache, seed=0, epoch=0, block_size=block_size, batch_size=batch_size, cache_dir=cache_dir)
    V = int(CacheReader(cache, check=False).attrs["teacher"]["vocab_size"])
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                     collate_fn=partial(L._pack_and_check, vocab_size=V),
                                     prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    n = sum(len(L.unpack_records(b)) for b in dl)
    return n, time.perf_counter() - t0


def _per_chunk(inner, **_kw):
    """zarr's own reads (one range GET per inner chunk): stands in for WholeObjectStore."""
    return inner


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="reduced", choices=list(SHAPES))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--workers", default="0,4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--need", type=float, default=64.0, help="the trainer's consumption, samples/s")
    args = ap.parse_args(argv)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    server = counter = Server()
    endpoint = server.endpoint
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import s3fs

    import kdcache.cache.remote as remote
    from kdcache.cache.store import cache_location

    n_vis, n_text, k, D, V = SHAPES[args.shapes]
    workers = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-remote-"))
    t = time.perf_counter()
    local = L.synthetic_cache(tmp / "c.zarr", n_vis, n_text, k, D, V, args.samples)
    print(f"synthetic cache: {args.samples} samples, {args.shapes} shapes, written in {time.perf_counter() - t:.1f} s",
          flush=True)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(str(local), "bench/c.zarr", recursive=True)
    url = "s3://bench/c.zarr"
    stored = cache_location(local).nbytes()
    print(f"uploaded: {stored / 2**20:.1f} MiB, {len(fs.find('bench/c.zarr'))} objects; server {endpoint}\n", flush=True)

    rows = []

    def row(name, cache, w, cache_dir=None, per_chunk=False):
        real = remote.WholeObjectStore
        if per_chunk:
            remote.WholeObjectStore = _per_chunk
        try:
            before = counter.n
            n, dt = one_pass(cache, w, args.batch_size, args.block_size, cache_dir)
        finally:
            remote.WholeObjectStore = real
        req = (counter.n - before) / max(n, 1)
        rate = n / dt
        rows.append((name, w, rate, "-" if cache == local else f"{req:.2f}", stored / dt / 2**20, rate / args.need))
        print(f"  {name:<34} workers {w}: {rate:7.1f} samples/s", flush=True)

    for w in workers:
        row("local directory", local, w)
        row("s3://, zarr per-chunk GETs", url, w, per_chunk=True)
        row("s3://, whole objects + read-ahead", url, w)
        d = tmp / f"dl{w}"
        row("s3:// --cache-dir, epoch 1", url, w, cache_dir=d)
        row("s3:// --cache-dir, epoch 2", url, w, cache_dir=d)
    print("\n### loader (one pass over the cache)\n")
    print("| source | workers | samples/s | req/sample | MB/s stored | x need |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, w, rate, req, mbs, x in rows:
        print(f"| {name} | {w} | {rate:.1f} | {req} | {mbs:.1f} | {x:.2f} |")

    # ---- writes ------------------------------------------------------------------------------
    from kdcache.cache.reader import CacheReader
    from kdcache.cache.writer import CacheWriter

    src = CacheReader(local)
    recs = src.read_rows(src.parts[0], src.parts[0].ok)
    wrows = []
    for name, out in (("local directory", tmp / "w.zarr"), ("s3://", "s3://bench/w.zarr")):
        before = counter.n
        t = time.perf_counter()
        with CacheWriter(out, src.attrs) as wr:
            for r in recs:
                wr.add(r)
        dt = time.perf_counter() - t
        wrows.append((name, len(recs) / dt, stored / dt / 2**20, counter.n - before if name != "local directory" else "-"))
    print("\n### write (CacheWriter.add of the same records, default layout)\n")
    print("| target | samples/s | MB/s stored | requests |")
    print("| --- | --- | --- | --- |")
    for name, rate, mbs, req in wrows:
        print(f"| {name} | {rate:.1f} | {mbs:.1f} | {req} |")

    # ---- FsspecStore vs ObjectStore --------------------------------------------------------------
    import zarr
    from zarr.storage import FsspecStore

    srows = []
    stores = [("FsspecStore (s3fs)", lambda: FsspecStore.from_url(url, read_only=True))]
    try:
        from obstore.store import S3Store
        from zarr.storage import ObjectStore

        stores.append(("ObjectStore (obstore)", lambda: ObjectStore(
            S3Store("bench", prefix="c.zarr", endpoint=endpoint, client_options={"allow_http": True},
                    region="us-east-1"), read_only=True)))
    except ImportError:
        srows.append(("ObjectStore (obstore)", None, None, "obstore not installed"))
    for name, make in stores:
        for whole in (False, True):
            st = make()
            if whole:
                st = remote.WholeObjectStore(st, url=url)
            before = counter.n
            t = time.perf_counter()
            a = zarr.open_array(st, path="parts/0/topk_ids", mode="r", zarr_format=3)
            data = a[...]
            dt = time.perf_counter() - t
            srows.append((name + (" + whole objects" if whole else ""), dt, data.nbytes / dt / 2**20, counter.n - before))
    print("\n### stores (the whole topk_ids array of part 0)\n")
    print("| store | seconds | MB/s decoded | requests |")
    print("| --- | --- | --- | --- |")
    for name, dt, mbs, req in srows:
        print(f"| {name} | {dt:.2f} | {mbs:.1f} | {req} |" if dt is not None else f"| {name} | - | - | {req} |")
    server.stop()


if __name__ == "__main__":
    main()
