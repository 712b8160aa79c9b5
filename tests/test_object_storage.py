"""Caches on object storage, end to end against a real S3-protocol server (tests/s3server.py):
dump to s3:// -> verify -> train --stage dft --cache s3:// -> export to s3:// -> pyarrow, all
through the CLI, and the same bytes as a local dump (so `aws s3 sync` / s3fs `put` either way
gives a readable cache)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache.cache import CacheReader, CacheWriter
from kdcache.cache.verify import verify_cache
from kdcache.config import DumpConfig
from kdcache.dump import dump
from tests.test_crash import forkserver  # noqa: F401  (fixture: a forkserver with torch preloaded)

ROWS = 10  # samples of the tiny dump


def _run(args, env, cwd):
    r = subprocess.run([sys.executable, "-m", "kdcache.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert env["AWS_SECRET_ACCESS_KEY"] not in r.stdout + r.stderr  # credentials are never printed
    return r


@pytest.fixture(scope="module")
def small_data(synth_data, tmp_path_factory) -> Path:
    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:ROWS]
    p = tmp_path_factory.mktemp("s3data") / "instruct10.json"
    p.write_text(json.dumps(rows))
    return p


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".writer-")}


def test_dump_verify_train_export_through_s3(tiny_teacher, tiny_student, synth_data, small_data, s3_url, tmp_path,
                                            cli_env):
    import pyarrow.parquet as pq
    import s3fs

    env = cli_env()
    url = f"{s3_url}/runs/t.zarr"
    common = ["--teacher", str(tiny_teacher), "--data", str(small_data), "--images", str(synth_data["images_root"]),
              "--num-workers", "0", "--batch-size", "4"]
    r = _run(["dump", *common, "--out", url], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"cache {url}: {ROWS} samples" in r.stdout
    assert not (tmp_path / "s3:").exists() and not any(tmp_path.iterdir())  # nothing written locally
    fs = s3fs.S3FileSystem(skip_instance_cache=True)

    r = _run(["verify", url], env, tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr

    r = _run(["train", "--stage", "dft", "--student", str(tiny_student), "--data", str(small_data), "--images",
              str(synth_data["images_root"]), "--cache", url, "--out", "run", "--max-steps", "2", "--batch-size",
              "4", "--num-workers", "1", "--log-every", "1", "--cache-dir", "dl"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert any(p.is_file() for p in (tmp_path / "dl").rglob("*"))  # the worker kept its disk copy
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss/total"]) and m["loss/res"] > 0 for m in metrics)  # the cache's KD terms ran
    assert "kdcache-test-secret" not in (tmp_path / "run" / "train_config.json").read_text()

    pq_url = f"{s3_url}/export/t.parquet"
    r = _run(["export", url, "--parquet", pq_url], env, tmp_path)
    assert r.returncode == 0, r.stderr
    with fs.open(pq_url, "rb") as f:
        table = pq.read_table(f)
    reader = CacheReader(url)
    assert table.num_rows == sum(int(p.cols["counts"][p.ok].sum()) for p in reader.parts.values()) > 0
    assert set(table.column("sample_id").to_pylist()) == set(reader.sample_ids(reader.parts[0], reader.parts[0].ok))

    # The same dump again writes nothing; into a local directory it gives the same bytes, so
    # download <-> upload (aws s3 sync, s3fs get/put) are plain copies of a readable cache.
    before = {k: v["ETag"] for k, v in fs.find(url, detail=True).items()}
    cfg = dict(teacher=str(tiny_teacher), data=str(small_data), images=str(synth_data["images_root"]), num_workers=0,
               batch_size=4)
    dump(DumpConfig(out=url, **cfg))
    assert {k: v["ETag"] for k, v in fs.find(url, detail=True).items()} == before
    local = dump(DumpConfig(out=str(tmp_path / "local.zarr"), **cfg))
    fs.get(url, str(tmp_path / "down.zarr"), recursive=True)
    assert _tree(tmp_path / "down.zarr") == _tree(local)
    fs.put(str(local), f"{s3_url}/up.zarr", recursive=True)
    assert CacheReader(f"{s3_url}/up.zarr").num_samples == ROWS
    assert verify_cache(f"{s3_url}/up.zarr").ok


# ---- one writer per part: the lease object ------------------------------------------------------
def test_second_writer_is_refused_and_a_dead_writers_lease_is_taken(s3_url):
    import socket
    import time

    from kdcache.cache.store import CacheLocked, cache_location
    from tests.cache.helpers import SMALL, make_attrs_for, make_record

    url = f"{s3_url}/c.zarr"
    loc = cache_location(url)
    w1 = CacheWriter(url, make_attrs_for(), layout=SMALL)
    w1.add(make_record(0))
    with pytest.raises(CacheLocked, match=r"part 0 of s3://.* is being written by .* pid \d+"):
        CacheWriter(url, make_attrs_for(), layout=SMALL)
    w1.abandon()  # releases the lease; the buffered sample is dropped
    assert not loc.exists(".writer-0.lease")

    def plant(host, pid, expires):
        loc.put_bytes(".writer-0.lease", json.dumps({"token": "other", "host": host, "pid": pid,
                                                     "expires": expires}).encode())

    plant("another-host", 1234, time.time() + 600)  # a live writer elsewhere
    with pytest.raises(CacheLocked, match="another-host pid 1234"):
        CacheWriter(url, make_attrs_for(), layout=SMALL)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for host, pid, expires in (("another-host", 1234, time.time() - 1),  # expired: its writer stopped renewing
                               (socket.gethostname(), dead.pid, time.time() + 600)):  # dead process on this host
        plant(host, pid, expires)
        w = CacheWriter(url, make_attrs_for(), layout=SMALL)
        assert json.loads(loc.read_bytes(".writer-0.lease"))["pid"] == os.getpid()
        w.close()
        assert not loc.exists(".writer-0.lease")
    assert CacheReader(url).num_samples == 0


def test_exclusive_put_is_a_conditional_write_on_the_server(s3_url):
    from kdcache.cache.store import cache_location

    loc = cache_location(f"{s3_url}/x")
    loc.put_bytes("k", b"1", exclusive=True)
    with pytest.raises(FileExistsError):  # If-None-Match: * -> 412 from the server
        loc.put_bytes("k", b"2", exclusive=True)
    assert loc.read_bytes("k") == b"1"


# ---- SIGKILL at named points of the commit protocol, resume, same cache as uninterrupted -------
def _child(env: dict, argv: list[str], fault: str | None, log: str) -> None:
    os.environ.update(env)
    from tests.test_crash import _run_cli

    _run_cli(argv, fault, log, None)


def test_sigkill_then_resume_on_s3_equals_an_uninterrupted_local_dump(tiny_teacher, synth_data, small_data, s3_url,
                                                                      tmp_path, forkserver):
    """Kills between the object writes of each commit step (tests/test_crash.py covers all ten
    points locally; a PUT is atomic, so these are the states an object store can be left in)."""
    import s3fs

    from tests.test_dump import _assert_same_cache, _cli_args

    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                      "AWS_ENDPOINT_URL")}

    def run(out, fault, name):
        argv = [*_cli_args(tiny_teacher, small_data, synth_data["images_root"], out),
                "--commit-every-s", "0"]
        p = forkserver.Process(target=_child, args=(env, argv, fault, str(tmp_path / f"{name}.log")))
        p.start()
        p.join(240)
        assert p.exitcode is not None, (tmp_path / f"{name}.log").read_text()[-3000:]
        return p.exitcode

    url = f"{s3_url}/killed.zarr"
    plan = [("shard", 2), ("index", 1), ("committed", 1), ("close", 1)]
    killed = [site for i, (site, n) in enumerate(plan) if run(url, f"{site}:{n}", f"kill{i}") == -signal.SIGKILL]
    assert killed == [site for site, _ in plan]  # each run died at its point and left the next one work
    assert run(url, None, "final") == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert run(tmp_path / "ref.zarr", None, "ref") == 0
    s3fs.S3FileSystem(skip_instance_cache=True).get(url, str(tmp_path / "down.zarr"), recursive=True)
    _assert_same_cache(tmp_path / "down.zarr", tmp_path / "ref.zarr")
    assert verify_cache(url).ok
    assert not cache_location_exists(url, ".writer-0.lease")


def cache_location_exists(url: str, key: str) -> bool:
    from kdcache.cache.store import cache_location

    return cache_location(url).exists(key)


def test_verify_and_reader_catch_a_truncated_object(s3_url):
    import s3fs

    from kdcache.cache.format import CacheCorrupt
    from tests.cache.helpers import SMALL, make_attrs_for, make_record

    url = f"{s3_url}/c.zarr"
    with CacheWriter(url, make_attrs_for(), layout=SMALL) as w:
        for i in range(8):
            w.add(make_record(i))
        w.write_gram(np.eye(16, dtype=np.float32))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    shard = sorted(k for k in fs.find(f"{url}/parts/0/topk_logprobs") if not k.endswith("zarr.json"))[0]
    fs.pipe_file(shard, fs.cat_file(shard)[:-7])  # truncated behind the reader's back
    rep = verify_cache(url)
    assert not rep.ok and any("topk_logprobs" in p for p in rep.problems), str(rep)
    reader = CacheReader(url)
    with pytest.raises(CacheCorrupt, match=r"cache s3://.*topk_logprobs.*dataset row 0"):
        reader.read_rows(reader.parts[0], reader.parts[0].ok)


def test_two_rank_dump_to_s3_opens_as_one(tiny_teacher, synth_data, small_data, s3_url, tmp_path, cli_env):
    """torchrun, two ranks (gloo), one part each under one URL: rank 1 waits for rank 0's root
    objects through the store; the cache equals a one-rank local dump sample by sample."""
    from tests.test_dump import BATCH, TOP_K, _assert_same_records, _cli_args

    url = f"{s3_url}/two.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "kdcache.cli", *_cli_args(tiny_teacher, small_data, synth_data["images_root"], url)]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    two = CacheReader(url)
    assert sorted(two.parts) == [0, 1] and all(p.finished for p in two.parts.values())
    for rank, p in two.parts.items():
        assert all(int(row) % 2 == rank for row in p.cols["row"])
    one = CacheReader(dump(DumpConfig(teacher=str(tiny_teacher), data=str(small_data),
                                      images=str(synth_data["images_root"]), out=str(tmp_path / "one.zarr"),
                                      num_workers=0, batch_size=BATCH, top_k=TOP_K, device="cpu")))
    _assert_same_records(two, one, exact=False)
    assert verify_cache(url).ok
    assert not any(cache_location_exists(url, f".writer-{k}.lease") for k in (0, 1))


def test_store_gone_mid_dump_is_one_line_then_the_same_command_resumes(tiny_teacher, synth_data, small_data, s3_url,
                                                                      s3_server, tmp_path, monkeypatch):
    """A second moto server (same in-process backend, so the bucket is shared) stops right after
    the dump's first commit: the dump fails with one DumpError naming the URL and the fix, the
    committed samples are kept, and the same dump through the running server finishes the cache."""
    import kdcache.cache.writer as W
    from kdcache.dump import DumpError
    from tests.s3server import start_server

    server, endpoint = start_server()
    url = f"{s3_url}/gone.zarr"

    class StopsTheServer(W.CacheWriter):  # the test's hand on the network, not a stand-in store
        def _commit(self, j, ends):
            super()._commit(j, ends)
            server.stop()

    monkeypatch.setattr(W, "CacheWriter", StopsTheServer)
    cfg = dict(teacher=str(tiny_teacher), data=str(small_data), images=str(synth_data["images_root"]), num_workers=0,
               batch_size=2, commit_every_s=0.0, device="cpu")
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches clients by options: none made with the old endpoint
    with pytest.raises(DumpError) as e:
        dump(DumpConfig(out=url, **cfg))
    msg = str(e.value)
    assert url in msg and "run the same command again to resume" in msg and "\n" not in msg
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # "the server is back" (a rerun is a new process:
    s3fs.S3FileSystem.clear_instance_cache()           #  no client cached with the old endpoint)
    monkeypatch.setattr(W, "CacheWriter", StopsTheServer.__mro__[1])
    assert 0 < CacheReader(url).num_samples < ROWS  # the first commit is there
    dump(DumpConfig(out=url, **cfg))
    assert CacheReader(url).num_samples == ROWS and verify_cache(url).ok
