"""SIGKILL a dump at 10 named points, resume each time, end identical to an uninterrupted dump.

The kill points are the writer's fault hook (``KDCACHE_FAULT=<site>:<n>``, kdcache/cache/writer.py):
``data`` (after a data-array slab write: between two arrays of one drain, or before the index),
``shard`` (between two shards of one slab), ``index`` (between two index-array writes),
``commit`` / ``committed`` (right before / after the commit attribute), ``close`` (between the
trims of ``close()`` and ``finished: true``). Before each kill, a counting run on a copy of the
cache (``KDCACHE_FAULT=count``) says how often each site will be reached from that state; a
seeded RNG then picks a site (every reachable site before any repeats; ``close`` last) and a hit
count among the first 1/(runs left) of that site's hits, so the kills spread over the dump.

What is covered: process death at every point between two zarr key writes of the commit
protocol, and (a planted ``<key>.<uuid>.partial`` next to a real shard before every resume) what
a death *inside* a key write leaves: zarr's LocalStore writes each key to such a temp file and
renames it into place, so the key itself is old or new, never torn, and the sweep on open
removes the temp file. Kills at arbitrary moments (mid-forward, mid-flush) are in
tests/test_dump.py (timed SIGKILLs); a rank killed in a two-rank dump in tests/test_reliability.py.
Not covered: power loss or a kernel crash (nothing is fsync'ed: a renamed file may be lost or
empty after one), bytes torn inside LocalStore's own write (trusted, zarr >= 3.1.3), and kills
while rank 0 creates the cache root or rewrites the Gram matrix.

Layout: the dump CLI has no layout option and the default one (32 MiB shards) puts this tiny
dump in one shard per array, so every run here writes with ``tests/cache/helpers.SMALL`` (512 B
chunks, 2 KiB shards: ~7 top-k shards, ~64 hidden-state shards) through a ``CacheWriter`` subclass
that only passes that layout. Runs: the real ``kdcache.cli`` app in processes forked from a
multiprocessing forkserver that has imported torch/transformers once (a fresh interpreter pays
~5 s of imports per run, 11 runs); each run is killed by a real SIGKILL of its own process.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import random
import re
import shutil
import signal
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cache.reader import CacheReader
from kdcache.cache.writer import FAULT_SITES
from kdcache.cli import app
from tests.test_dump import (
    _assert_same_cache,
    _assert_same_records,
    _cli_args,
    _committed,
)

KILLS = 10
PRELOAD = ["torch", "transformers", "zarr", "kdcache.cli", "kdcache.dump", "kdcache.teacher", "kdcache.models",
           "kdcache.cache.writer", "kdcache.data.collate", "tests.test_crash"]


def _run_cli(argv: list[str], fault: str | None, log: str, counts_out: str | None) -> None:
    """Child process body: ``kdcache <argv>`` with fault plan ``fault`` and the SMALL layout;
    stdout/stderr to ``log``; in count mode the hit counts as JSON to ``counts_out``. Exits with
    the CLI's code (or dies by the planned SIGKILL)."""
    import os
    import sys

    import torch

    import kdcache.cache.writer as W
    from tests.cache.helpers import SMALL
    from tests.conftest import subprocess_env

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(subprocess_env())
    torch.set_num_threads(1)

    class SmallShards(W.CacheWriter):
        def __init__(self, *a, **kw):
            super().__init__(*a, layout=SMALL, **kw)

    W.CacheWriter = SmallShards  # kdcache.dump imports it from the module at call time
    hits = W.set_fault_plan(fault)
    code = 1
    try:
        app(argv, prog_name="kdcache")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        if counts_out:
            Path(counts_out).write_text(json.dumps(dict(hits)))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    yield ctx
    stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)  # frees the preloaded server
    if stop is not None:
        stop()


def _run(ctx, argv, fault, log: Path, counts_out: Path | None = None, timeout: float = 120) -> int:
    """Run one dump in a child; returns its exit code (-9: SIGKILL)."""
    p = ctx.Process(target=_run_cli, args=(argv, fault, str(log), str(counts_out) if counts_out else None))
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        raise AssertionError(f"run {fault} hung:\n{log.read_text()[-3000:]}")
    return p.exitcode


def _count(ctx, argv_for, out: Path, scratch: Path) -> dict[str, int]:
    """Hits per fault site of a dump resumed from ``out``'s current state (run on a copy)."""
    probe = scratch / "probe.zarr"
    shutil.rmtree(probe, ignore_errors=True)
    if out.exists():
        shutil.copytree(out, probe)
    code = _run(ctx, argv_for(probe), "count", scratch / "probe.log", scratch / "counts.json")
    assert code == 0, (scratch / "probe.log").read_text()[-3000:]
    return json.loads((scratch / "counts.json").read_text())


def _plant_partial(out: Path) -> Path:
    """A leftover temp file as a write killed inside LocalStore leaves: ``<key>.<uuid>.partial``."""
    shard = next(p for p in sorted((out / "parts" / "0" / "topk_ids").rglob("*")) if p.is_file())
    fake = shard.with_name(f"{shard.name}.{uuid.uuid4().hex}.partial")
    fake.write_bytes(b"half a shard")
    return fake


def test_sigkill_at_ten_named_points_then_resume_equals_uninterrupted(tiny_teacher, synth_data, tmp_path,
                                                                       forkserver):
    def argv_for(path: Path) -> list[str]:
        return [*_cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], path),
                "--commit-every-s", "0"]

    # the uninterrupted reference: the counting run from an empty output is one
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    counts = _count(forkserver, argv_for, tmp_path / "absent.zarr", ref_dir)
    ref = ref_dir / "probe.zarr"
    assert set(counts) == set(FAULT_SITES) and all(counts.values()), counts  # every site is reached
    assert counts["commit"] >= 10 and counts["shard"] > 10, counts

    out = tmp_path / "killed.zarr"
    rng = random.Random(8)
    used: set[str] = set()
    kills, planted = [], None
    for i in range(KILLS):
        if i:
            counts = _count(forkserver, argv_for, out, tmp_path)
        # close comes last: once close() runs every sample is committed and no other site is left
        reachable = sorted(s for s, n in counts.items() if n > 0 and (s != "close" or i == KILLS - 1))
        site = rng.choice(sorted(set(reachable) - used) or reachable)
        # within this run's first 1/(runs left) of hits, so that the 10 kills spread over the dump
        n = rng.randint(1, max(1, counts[site] // (KILLS - i + 1)))
        used.add(site)
        log = tmp_path / f"kill{i}.log"
        code = _run(forkserver, argv_for(out), f"{site}:{n}", log)
        assert code == -signal.SIGKILL, f"run {i} ({site}:{n}) was not killed (exit {code}):\n{log.read_text()[-3000:]}"
        if planted is not None:
            assert not planted.exists(), f"run {i} did not sweep {planted}"
        kills.append((site, n, _committed(out / "parts" / "0")))
        planted = _plant_partial(out)
    assert used == set(FAULT_SITES), kills  # every kind of point was hit

    log = tmp_path / "final.log"
    assert _run(forkserver, argv_for(out), None, log) == 0, log.read_text()[-3000:]
    final = log.read_text().splitlines()[-1]
    assert re.match(r"(dump done: .*resumed after \d+ rows|nothing to do: all 20 rows)", final), final
    assert not planted.exists() and not list(out.rglob("*.partial"))
    _assert_same_cache(out, ref)
    _assert_same_records(CacheReader(out), CacheReader(ref), exact=True)
    v = CliRunner().invoke(app, ["verify", str(out)])
    assert v.exit_code == 0 and "OK" in v.output, v.output


def test_fault_spec_is_parsed_strictly():
    from kdcache.cache.writer import parse_fault_spec

    assert parse_fault_spec(None) == parse_fault_spec("") == {}
    assert parse_fault_spec("count") == dict.fromkeys(FAULT_SITES, 0)
    assert parse_fault_spec("shard:3") == {"shard": 3}
    for bad in ("shard", "shard:0", "shard:-1", "shard:x", "chunk:1", "count:1"):
        with pytest.raises(ValueError, match="KDCACHE_FAULT"):
            parse_fault_spec(bad)
