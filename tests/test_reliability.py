"""Reliability under damage from outside: out-of-range ids in a cache, a disk that fills up during a
dump, and one of two dump ranks killed.

Every test uses the real pieces: the tiny teacher's dump, the real writer for the damaged cache,
a real (tmpfs) filesystem that runs out of space, and torchrun with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache.reader import CacheReader, global_order
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import CacheWriter
from kdcache.cli import app
from kdcache.dump import dump
from kdcache.train import CacheRecordError, check_packed_records, pack_records, train
from tests.test_dump import _assert_same_cache, _cfg, _cli_args, _committed
from tests.test_train import make_cfg


@pytest.fixture(scope="module")
def ref_cache(tiny_teacher, synth_data, tmp_path_factory) -> Path:
    """One rank, uninterrupted (as test_dump's reference): instruct_small, top-8, batch 2."""
    out = tmp_path_factory.mktemp("rel_ref") / "ref.zarr"
    dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out))
    return out


def _rewrite(src: Path, dst: Path, edit) -> list:
    """Copy cache ``src`` to ``dst`` through the real writer, ``edit(records)`` in between."""
    reader = CacheReader(src)
    recs = reader.read_range(0, 0, reader.num_samples)
    edit(reader, recs)
    w = CacheWriter(dst, json.loads(json.dumps(reader.attrs)), rank=0, world_size=1)
    w.write_gram(reader.gram())
    for r in recs:
        w.add(r)
    w.close(finished=True)
    return recs


# ---------------------------------------------------------------------------------------------
# 1. ids outside [0, V) never reach a gather


def test_out_of_range_id_is_refused_before_the_gather(ref_cache, synth_data, tiny_student, tmp_path):
    V = int(CacheReader(ref_cache).attrs["teacher"]["vocab_size"])
    victim = {}

    def edit(reader, recs):
        # the first sample of the first step (batch 4, seed 0, block 64)
        r = recs[global_order(reader.part_sizes, 0, 0, 64)[0][1]]
        r.topk_ids = r.topk_ids.clone()
        r.topk_ids[0, -1] = V  # one id past the vocabulary
        victim["id"] = r.sample_id

    bad = tmp_path / "bad.zarr"
    _rewrite(ref_cache, bad, edit)
    assert "outside [0" in str(verify_cache(bad))  # verify reports it too
    with pytest.raises(CacheRecordError, match=rf"{victim['id']}.*vocabulary \[0, {V}\).*kdcache verify"):
        train(make_cfg(synth_data, tiny_student, tmp_path / "run", cache=str(bad), max_steps=1))
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_check_packed_records_names_the_samples(ref_cache):
    recs = CacheReader(ref_cache).read_range(0, 0, 3)
    V = int(CacheReader(ref_cache).attrs["teacher"]["vocab_size"])
    assert check_packed_records(pack_records(recs), V, "c.zarr") == []
    recs[1].tail_logmass = recs[1].tail_logmass.clone()
    recs[1].tail_logmass[-1] = float("nan")
    recs[2].topk_logprobs = recs[2].topk_logprobs.clone()
    recs[2].topk_logprobs[0, 0] = float("inf")
    assert check_packed_records(pack_records(recs), V, "c.zarr") == [recs[1].sample_id, recs[2].sample_id]
    recs[0].topk_ids = recs[0].topk_ids.clone()
    recs[0].topk_ids[-1, 0] = -1
    with pytest.raises(CacheRecordError, match=rf"\['{recs[0].sample_id}'\]"):
        check_packed_records(pack_records(recs), V, "c.zarr")
    # -inf tail (k = V: nothing outside the top-k) is legitimate
    recs = CacheReader(ref_cache).read_range(0, 0, 2)
    recs[0].tail_logmass = torch.full_like(recs[0].tail_logmass, float("-inf"))
    assert check_packed_records(pack_records(recs), V, "c.zarr") == []


# ---------------------------------------------------------------------------------------------
# 2. disk full during a dump


@pytest.fixture
def small_fs(tmp_path):
    """A real tmpfs mount (root in a container can mount one); yields (dir, remount(size))."""
    mnt = tmp_path / "fs"
    mnt.mkdir()

    def mount(opts: str) -> bool:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                              capture_output=True, check=False).returncode == 0

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True, capture_output=True)

    if not mount("size=256k"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_disk_full_stops_cleanly_and_rerun_finishes(ref_cache, tiny_teacher, synth_data, small_fs):
    mnt, remount = small_fs
    out = mnt / "c.zarr"
    # what the finished cache takes on this filesystem (tmpfs counts directories and whole pages)
    remount("16m")
    shutil.copytree(ref_cache, out)
    st = os.statvfs(mnt)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    shutil.rmtree(out)
    # a running dump needs more than the result (untrimmed shards, temp files): it fills up about halfway
    remount(f"{used // 4096 * 4096}")
    args = _cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out)
    res = CliRunner().invoke(app, [*args, "--commit-every-s", "0"])
    assert res.exit_code == 2, res.output
    err = [ln for ln in res.output.splitlines() if "disk full" in ln]
    assert len(err) == 1 and str(out) in err[0] and "ENOSPC" in err[0] and "run the same command again" in err[0], \
        res.output
    assert "Traceback" not in res.output
    done = _committed(out / "parts" / "0")
    assert 0 < done < 20, (done, res.output)
    rep = verify_cache(out)  # the committed part is intact
    assert rep.ok and rep.samples_checked == done, str(rep)
    assert not list(out.rglob("*.partial"))
    remount("16m")  # space is available again
    res = CliRunner().invoke(app, [*args, "--commit-every-s", "0"])
    assert res.exit_code == 0, res.output
    assert f"resumed after {done} rows committed earlier" in res.output
    _assert_same_cache(out, ref_cache)


# ---------------------------------------------------------------------------------------------
# 3. two ranks, one killed


def _rank_pid(parent: int, rank: int, deadline: float) -> int:
    """pid of the torchrun worker with RANK=rank under ``parent`` (from /proc)."""
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                env = (d / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


def _torchrun(args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", "2", "-m", "kdcache.cli", *args, "--commit-every-s", "0"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs /proc and signals")
def test_two_ranks_one_killed_then_rerun_equals_uninterrupted(tiny_teacher, synth_data, tmp_path, cli_env):
    env = cli_env()
    ref = tmp_path / "ref2.zarr"
    res = subprocess.run(_torchrun(_cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"],
                                             ref)), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr

    out = tmp_path / "killed2.zarr"
    cmd = _torchrun(_cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    victim = _rank_pid(proc.pid, 1, deadline)
    while _committed(out / "parts" / "1") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    log = proc.communicate(timeout=120)[0]  # the survivor must not hang
    assert proc.returncode != 0, log
    assert time.monotonic() - t_kill < 120
    killed_at = _committed(out / "parts" / "1")
    assert 2 <= killed_at < 10, (killed_at, log)
    rep = verify_cache(out)
    assert rep.ok, str(rep)  # both parts' committed samples are intact

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "20 samples in 2 part(s)" in res.stdout
    _assert_same_cache(out, ref)
    assert np.array_equal(CacheReader(out).gram(), CacheReader(ref).gram())
