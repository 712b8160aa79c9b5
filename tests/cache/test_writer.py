"""Writer: buffering and commits, resume after a crash, refusing other settings, ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from kdcache.cache import CacheMismatch, CacheReader, CacheWriter
from kdcache.cache.format import INDEX_ARRAYS

from .helpers import SMALL, make_attrs_for, make_record, write_cache

HELPERS = Path(__file__).with_name("helpers.py")


def run_py(code: str, *args: str, wait: bool = True):
    """Run ``code`` in a fresh interpreter with the test helpers importable as ``helpers``."""
    prelude = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("helpers", {str(HELPERS)!r})
        helpers = importlib.util.module_from_spec(spec); spec.loader.exec_module(helpers)
    """)
    cmd = [sys.executable, "-c", prelude + textwrap.dedent(code), *args]
    if not wait:
        return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def part_arrays(path: Path, rank: int = 0) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path / "parts" / str(rank)), mode="r")
    out = {name: a[...] for name, a in g.arrays()}
    out.update({f"index/{n}": a[...] for n, a in g["index"].arrays()})
    return out


def part_attrs(path: Path, rank: int = 0) -> dict:
    return json.loads((path / "parts" / str(rank) / "zarr.json").read_text())["attributes"]


def test_buffering_writes_whole_shards_and_reader_sees_only_committed(tmp_path, records):
    path = tmp_path / "c"
    w = CacheWriter(path, make_attrs_for(), layout=SMALL)
    shard = w.dspecs["topk_ids"].shard_rows  # 2048 B of int32 [k=8] rows = 64 positions
    assert shard == 64 and w.dspecs["topk_ids"].aligned and not w.dspecs["roles"].aligned
    w.add(records[0])
    w.add(records[1])
    # two small samples fill no shard: nothing is written or committed yet
    assert w.buffered() == 2 and part_attrs(path)["committed"]["samples"] == 0
    assert CacheReader(path).num_samples == 0
    w.flush()
    assert part_attrs(path)["committed"]["samples"] == 2 and w.buffered() == 0
    commits, p0 = [], w._written["topk_ids"]
    for rec in records[2:]:
        w.add(rec)
        # big arrays advance only to shard boundaries (from where the flush left them)
        assert w._written["topk_ids"] == p0 or w._written["topk_ids"] % shard == 0
        assert CacheReader(path).num_samples == w.num_committed
        commits.append(w.num_committed)
    # commits happened by themselves, in slabs: far fewer commits than samples
    steps = sorted(set(commits))
    assert 3 <= len(steps) <= len(commits) // 3
    assert w.num_committed < 40
    w.close()
    assert CacheReader(path).num_samples == 40
    assert part_attrs(path)["finished"] is True and w.is_finished()
    # arrays are trimmed to the committed totals
    arrays = part_arrays(path)
    totals = part_attrs(path)["committed"]
    assert arrays["input_ids"].shape[0] == totals["tokens"]
    assert arrays["topk_ids"].shape == (totals["positions"], 8)
    assert arrays["visual_hidden"].shape == (totals["visual"], 16)
    assert arrays["index/row"].shape == (40,)


def test_skip_and_committed_rows(tmp_path, records):
    path = tmp_path / "c"
    w = CacheWriter(path, make_attrs_for(), layout=SMALL)
    w.add(records[0])
    w.skip(5, "s00005", "corrupt_image")
    w.add(records[3])
    with pytest.raises(ValueError, match="already in part 0"):
        w.add(records[3])
    with pytest.raises(ValueError, match="unknown skip reason"):
        w.skip(9, "x", "bored")
    w.close()
    w2 = CacheWriter(path, make_attrs_for(), layout=SMALL)
    assert w2.committed_rows() == [0, 5, 3]
    r = CacheReader(path)
    assert r.rows() == [0, 3] and r.skipped() == [(5, "s00005", "corrupt_image")]


def test_add_refuses_inconsistent_records(tmp_path, records):
    w = CacheWriter(tmp_path / "c", make_attrs_for(), layout=SMALL)
    bad = make_record(50)
    bad.positions = bad.positions[1:]
    bad.kinds = bad.kinds[1:]
    bad.topk_ids, bad.topk_logprobs = bad.topk_ids[1:], bad.topk_logprobs[1:]
    bad.tail_logmass = bad.tail_logmass[1:]
    with pytest.raises(ValueError, match="s00050.*select_positions"):
        w.add(bad)
    bad = make_record(51)
    bad.visual_hidden = bad.visual_hidden[:-1]
    with pytest.raises(ValueError, match="s00051.*visual_hidden"):
        w.add(bad)
    bad = make_record(52, k=4)
    with pytest.raises(ValueError, match="k=8"):
        w.add(bad)
    assert w.committed_rows() == [] and w.buffered() == 0


def test_reopen_with_other_settings_raises_naming_the_key(tmp_path, records):
    path = tmp_path / "c"
    write_cache(path, records[:3])
    with pytest.raises(CacheMismatch, match="settings.top_k: cache has 8, this run asks 4"):
        CacheWriter(path, make_attrs_for(k=4), layout=SMALL)
    with pytest.raises(CacheMismatch, match="settings.hidden"):
        CacheWriter(path, make_attrs_for(hidden="fp16"), layout=SMALL)
    # same settings, new kdcache version: fine
    a = make_attrs_for()
    a["kdcache_version"] = "0.0.0-other"
    CacheWriter(path, a, layout=SMALL).close()


CRASH = """
import os, signal, sys
from pathlib import Path
from kdcache.cache import CacheWriter
path = sys.argv[1]
w = CacheWriter(path, helpers.make_attrs_for(), layout=helpers.SMALL)
for i in range(10):
    w.add(helpers.make_record(i))
w.flush()                               # rows 0..9 committed
for i in range(10, 14):
    w.add(helpers.make_record(i))
print(w.num_committed, w.buffered(), flush=True)
w._write_big(force=True)                # data of the buffered rows on disk past the commit point
w._write_index(w._pending)              # ...and their index rows, but no commit record
# a write killed between open and rename leaves a temp file like zarr's own
chunk_dir = Path(path, "parts/0/topk_logprobs/c/0")
Path(chunk_dir, "0.0123456789abcdef.partial").write_bytes(b"junk")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    p = run_py(CRASH, str(crashed))
    assert p.returncode == -9, p.stderr
    committed, pending = map(int, p.stdout.split())
    assert committed + pending == 14 and committed >= 10 and pending > 0
    assert list(crashed.rglob("*.partial"))
    assert CacheReader(crashed).num_samples == committed  # readers see only committed samples

    def finish(path, start_rows):
        w = CacheWriter(path, make_attrs_for(), layout=SMALL)
        assert w.committed_rows() == start_rows
        for i in range(len(start_rows), 25):
            if i == 13:  # the resumed run skips a row the crashed one had written
                w.skip(13, "s00013", "too_long")
            else:
                w.add(make_record(i))
        w.close()

    finish(crashed, list(range(committed)))
    assert not list(crashed.rglob("*.partial"))
    finish(clean, [])
    a, b = part_arrays(crashed), part_arrays(clean)
    assert set(a) == set(b) and len(a) == 8 + len(INDEX_ARRAYS) + 1
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), name
    assert part_attrs(crashed) == part_attrs(clean)
    assert CacheReader(crashed).rows() == [i for i in range(25) if i != 13]


RANK = """
import sys
from kdcache.cache import CacheWriter
path, rank = sys.argv[1], int(sys.argv[2])
w = CacheWriter(path, helpers.make_attrs_for(world_size=2), rank=rank, world_size=2,
                layout=helpers.SMALL, wait_timeout_s=60)
for i in range(rank, 20, 2):
    w.add(helpers.make_record(i))
w.close()
"""


def test_two_ranks_started_together(tmp_path):
    path = tmp_path / "c"
    # rank 1 first: it must wait for rank 0's root instead of creating an attribute-less one
    procs = [run_py(RANK, str(path), "1", wait=False), run_py(RANK, str(path), "0", wait=False)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err
    r = CacheReader(path)
    assert r.part_ranks == [0, 1] and r.part_sizes == [10, 10]
    assert sorted(r.rows()) == list(range(20))
    assert r.attrs["settings"]["world_size"] == 2


def test_nonzero_rank_times_out_without_rank_zero(tmp_path):
    with pytest.raises(TimeoutError, match="rank 0"):
        CacheWriter(tmp_path / "c", make_attrs_for(world_size=2), rank=1, world_size=2,
                    layout=SMALL, wait_timeout_s=0.2)


def test_gram_written_once_by_rank_zero(tmp_path, records):
    path = tmp_path / "c"
    w = CacheWriter(path, make_attrs_for(), layout=SMALL)
    W = np.random.default_rng(0).normal(size=(97, 16)).astype(np.float32)
    w.write_gram(W.T @ W)
    with pytest.raises(ValueError, match="D=16"):
        w.write_gram(np.eye(3))
    w.close()
    assert np.array_equal(CacheReader(path).gram(), W.T @ W)


def test_second_writer_of_a_part_is_refused_until_the_first_is_done(tmp_path, records):
    from kdcache.cache.writer import CacheLocked

    attrs = make_attrs_for()
    w = CacheWriter(tmp_path / "c", attrs, layout=SMALL)
    w.add(records[0])
    with pytest.raises(CacheLocked, match="being written by another process"):
        CacheWriter(tmp_path / "c", attrs, layout=SMALL)
    w.close(finished=False)
    w2 = CacheWriter(tmp_path / "c", attrs, layout=SMALL)  # the lock went with the first writer
    assert w2.committed_rows() == [records[0].row]
    w2.close()
