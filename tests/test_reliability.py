"""Reliability under damage from outside: out-of-range ids or non-finite values in a cache, a disk
that fills up during a dump, one of two dump ranks killed, and a rank that hangs (dump and train).

Every test uses the real pieces: the tiny teacher's dump, the real writer for the damaged cache,
a real (tmpfs) filesystem that runs out of space, and torchrun with SIGKILL / SIGSTOP. The dump
killed at named points is tests/test_crash.py.
"""

from __future__ import annotations

import contextlib
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
        # two loader processes: the check runs in the worker and its verdict reaches the trainer
        train(make_cfg(synth_data, tiny_student, tmp_path / "run", cache=str(bad), max_steps=1, num_workers=2))
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_check_packed_records_names_the_samples(ref_cache):
    reader = CacheReader(ref_cache)
    V = int(reader.attrs["teacher"]["vocab_size"])

    def batch(edit=None):
        recs = reader.read_range(0, 0, 3)
        if edit:
            edit(recs)
        return recs

    def refused(recs, who: int, array: str):
        r = recs[who]
        with pytest.raises(CacheRecordError, match=rf"c\.zarr: samples \['{r.sample_id}'\] \(rows \[{r.row}\]\) "
                                                   rf"have non-finite {array} .*`kdcache verify c\.zarr`"):
            check_packed_records(pack_records(recs), V, "c.zarr")

    def put(field, who, index, value):
        def edit(recs):
            t = getattr(recs[who], field).clone()
            t[index] = value
            setattr(recs[who], field, t)
        return edit

    check_packed_records(pack_records(batch()), V, "c.zarr")  # a sound batch passes
    refused(batch(put("topk_logprobs", 2, (0, 0), float("inf"))), 2, "topk_logprobs")
    refused(batch(put("topk_logprobs", 1, (-1, 3), float("nan"))), 1, "topk_logprobs")
    refused(batch(put("tail_logmass", 1, -1, float("nan"))), 1, "tail_logmass")
    refused(batch(put("visual_hidden", 0, (5, 7), float("nan"))), 0, "visual_hidden")
    refused(batch(put("visual_hidden", 2, (0, 0), float("-inf"))), 2, "visual_hidden")
    # the exact mode's per-position hidden states, when the cache has them
    recs = batch()
    for r in recs:
        r.position_hidden = torch.zeros(len(r.positions), 4, dtype=torch.bfloat16)
    check_packed_records(pack_records(recs), V, "c.zarr")
    recs[1].position_hidden[3, 2] = float("inf")
    refused(recs, 1, "position_hidden")
    # ids outside the vocabulary, named likewise
    recs = batch(put("topk_ids", 0, (-1, 0), -1))
    with pytest.raises(CacheRecordError, match=rf"\['{recs[0].sample_id}'\] \(rows \[{recs[0].row}\]\) have top-k ids "
                                               rf"outside the student's vocabulary \[0, {V}\)"):
        check_packed_records(pack_records(recs), V, "c.zarr")
    # -inf in a tail (k = V: nothing outside the top-k) or a log-prob (probability 0) is legitimate
    check_packed_records(pack_records(batch(put("tail_logmass", 0, slice(None), float("-inf")))), V, "c.zarr")
    check_packed_records(pack_records(batch(put("topk_logprobs", 1, (0, -1), float("-inf")))), V, "c.zarr")


def test_check_packed_records_takes_a_batch_without_visual_rows(ref_cache):
    """Issue 15: a batch of text-only samples packs [0, D] visual hidden states; the check passes it
    (it used to fail reshaping 0 rows) and still refuses a NaN elsewhere in the batch."""
    reader = CacheReader(ref_cache)
    V = int(reader.attrs["teacher"]["vocab_size"])
    recs = reader.read_range(0, 0, 2)
    for r in recs:  # as the cache returns a text-only sample: no visual rows
        r.visual_hidden = r.visual_hidden[:0]
    packed = pack_records(recs)
    assert packed["visual_hidden"].shape[0] == 0
    check_packed_records(packed, V, "c.zarr")
    recs[1].tail_logmass = recs[1].tail_logmass.clone()
    recs[1].tail_logmass[0] = float("nan")
    with pytest.raises(CacheRecordError, match=rf"\['{recs[1].sample_id}'\].*non-finite tail_logmass"):
        check_packed_records(pack_records(recs), V, "c.zarr")


def test_nonfinite_cache_is_refused_before_the_gather(ref_cache, synth_data, tiny_student, tmp_path):
    """A cache with NaN hidden states in one sample of step 3: steps 1-2 run and are checkpointed,
    then the run stops with the sample's id and row, the array and the fix (no NaN loss, no step
    skipped, nothing blamed on the student)."""
    victim = {}

    def edit(reader, recs):
        r = recs[global_order(reader.part_sizes, 0, 0, 64)[8][1]]  # first sample of step 3 (batch 4)
        r.visual_hidden = r.visual_hidden.clone()
        r.visual_hidden[-1, 0] = float("nan")
        victim.update(id=r.sample_id, row=r.row)

    bad = tmp_path / "nan.zarr"
    _rewrite(ref_cache, bad, edit)
    assert "non-finite" in str(verify_cache(bad))  # verify names it too
    out = tmp_path / "run"
    with pytest.raises(CacheRecordError, match=rf"\['{victim['id']}'\] \(rows \[{victim['row']}\]\) have non-finite "
                                               rf"visual_hidden .*kdcache verify {bad}"):
        train(make_cfg(synth_data, tiny_student, out, cache=str(bad), max_steps=4, save_every=2))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and not any(m["skipped"] for m in metrics)
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-2"]


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


# ---------------------------------------------------------------------------------------------
# 4. A wedged rank: its peers fail after dist_timeout_s instead of waiting forever


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T, Z...), or 'gone'."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _wedge_rank1_and_time_rank0(cmd, env, log: Path, ready, timeout_s: float) -> tuple[float, str]:
    """Start ``cmd`` (torchrun, two ranks), SIGSTOP rank 1 once ``ready()`` (alive and connected,
    it never reaches the next collective: a hung GPU, a stuck filesystem), and return how long
    rank 0 took to exit after that, and the run's output."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    r1 = None
    try:
        deadline = time.monotonic() + 180
        r0, r1 = _rank_pid(proc.pid, 0, deadline), _rank_pid(proc.pid, 1, deadline)
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        os.kill(r1, signal.SIGSTOP)
        t_stop = time.monotonic()
        while _state(r0) not in ("Z", "X", "gone") and time.monotonic() < t_stop + 3 * timeout_s + 30:
            time.sleep(0.05)
        waited = time.monotonic() - t_stop
    finally:
        if r1 is not None:
            with contextlib.suppress(ProcessLookupError):  # a stopped process only dies by SIGKILL, and
                os.kill(r1, signal.SIGKILL)                # torchrun would wait 30 s before sending one
        if proc.poll() is None and r1 is None:
            proc.terminate()  # torchrun passes it on to its workers
        proc.wait(timeout=60)
    return waited, log.read_text()


def test_wedged_rank_makes_the_dump_fail_after_dist_timeout(tiny_teacher, synth_data, tmp_path, cli_env):
    out = tmp_path / "wedged.zarr"
    cmd = _torchrun([*_cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out),
                     "--dist-timeout-s", "5"])
    waited, log = _wedge_rank1_and_time_rank0(cmd, cli_env(), tmp_path / "dump.log",
                                              lambda: _committed(out / "parts" / "1") >= 2, 5)
    # rank 0 finishes its part (~1 s), then waits 5 s in the totals' all_reduce and fails
    assert 5 <= waited < 30, (waited, log[-3000:])
    assert "timed out" in log.lower() or "timeout" in log.lower(), log[-3000:]
    assert "rank 0: its part is complete and committed, but a peer did not reach the end" in log, log[-3000:]
    assert _committed(out / "parts" / "0") == 10  # rank 0's part is complete and committed
    assert verify_cache(out).ok


def test_wedged_rank_makes_training_fail_after_dist_timeout(ref_cache, synth_data, tiny_student, tmp_path, cli_env):
    """The same through accelerate's process group (``InitProcessGroupKwargs(timeout=...)``)."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("log_every: 1\nmax_steps: 20\nbatch_size: 1\nlr: 1.0e-3\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "kdcache.cli", "train", "--stage", "dft", "--student", str(tiny_student),
           "--data", str(synth_data["instruct_small"]), "--images", str(synth_data["images_root"]),
           "--cache", str(ref_cache), "--out", str(out), "--num-workers", "0", "--config", str(extra),
           "--dist-timeout-s", "5"]
    metrics = out / "metrics.jsonl"
    waited, log = _wedge_rank1_and_time_rank0(cmd, cli_env(CUDA_VISIBLE_DEVICES=""), tmp_path / "train.log",
                                              lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, 5)
    assert 5 <= waited < 30, (waited, log[-3000:])
    assert "timed out" in log.lower() or "timeout" in log.lower(), log[-3000:]
    assert not (out / "DONE").exists()
