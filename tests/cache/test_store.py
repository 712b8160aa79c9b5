"""kdcache.cache.store: a cache argument -> a location; URLs kdcache cannot open are refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cache import CacheReader, CacheWriter
from kdcache.cache.store import CacheLocation, CacheLocationError, cache_location
from kdcache.cli import app

from .helpers import SMALL, make_attrs_for, make_record


@pytest.mark.parametrize("arg, path", [
    ("caches/t.zarr", "caches/t.zarr"),
    ("./s3:odd", "./s3:odd"),
    ("s3:odd", "s3:odd"),  # a colon in a file name; only "scheme:/..." is taken for a URL
    ("/abs/t.zarr", "/abs/t.zarr"),
    ("file:///abs/t.zarr", "/abs/t.zarr"),
    ("C:/data/t.zarr", "C:/data/t.zarr"),  # a one-letter "scheme" is a drive, not a URL
])
def test_local_paths_are_kept_as_given(arg, path):
    loc = cache_location(arg)
    assert loc.is_local and loc.protocol == "file"
    assert loc.local == Path(path) and os.fspath(loc) == os.fspath(Path(path))
    assert cache_location(Path(path)).local == Path(path)
    assert cache_location(loc) is loc


@pytest.mark.parametrize("arg, words", [
    ("nosuch://bucket/runs/t.zarr", ["nosuch://bucket/runs/t.zarr", "not a storage protocol"]),
    ("s3://", ["names no bucket"]),
    ("s3:/bucket/t.zarr", ["without its '//'", "s3://bucket/t.zarr"]),  # what pathlib makes of s3://bucket/t.zarr
    ("file://rel/t.zarr", ["absolute path"]),
    ("", ["empty"]),
])
def test_unusable_locations_are_refused_with_the_fix(arg, words):
    with pytest.raises(CacheLocationError) as e:
        cache_location(arg)
    for w in words:
        assert w in str(e.value)


def test_a_url_is_never_used_as_a_local_path():
    loc = CacheLocation("s3://b/k", "s3", "b/k", {"secret": "x"})
    with pytest.raises(CacheLocationError):
        os.fspath(loc)
    assert "secret" not in repr(loc) and str(loc) == "s3://b/k"


def test_file_url_writes_the_same_bytes_as_the_path(tmp_path):
    records = [make_record(i) for i in range(12)]
    trees = []
    for name, arg in (("a", str(tmp_path / "a.zarr")), ("b", f"file://{tmp_path / 'b.zarr'}")):
        with CacheWriter(arg, make_attrs_for(), layout=SMALL) as w:
            for r in records:
                w.add(r)
        root = tmp_path / f"{name}.zarr"
        trees.append({p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                      if p.is_file() and not p.name.endswith(".lock")})
    assert trees[0] and trees[0] == trees[1]
    assert CacheReader(f"file://{tmp_path / 'b.zarr'}").num_samples == 12


def _cli(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    finally:
        os.chdir(old)


@pytest.mark.parametrize("args", [
    ["dump", "--teacher", "t", "--data", "d.json", "--images", ".", "--out", "s3://bucket/runs/c.zarr"],
    ["verify", "s3://bucket/runs/c.zarr"],
    ["inspect", "s3://bucket/runs/c.zarr"],
    ["export", "s3://bucket/runs/c.zarr", "--parquet", "t.parquet"],
    ["train", "--stage", "dft", "--student", "s", "--data", "d.json", "--images", ".", "--out", "run",
     "--cache", "s3://bucket/runs/c.zarr"],
    ["eval", "--model", "m", "--data", "d.json", "--images", ".", "--teacher-cache", "s3://bucket/runs/c.zarr"],
])
def test_every_cache_command_refuses_an_unsupported_url(tmp_path, args):
    (tmp_path / "d.json").write_text("[]")
    r = _cli([a.replace("s3://", "nosuch://") for a in args], tmp_path)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert "nosuch://bucket/runs/c.zarr" in last and "not a storage protocol" in last and "Traceback" not in r.output
    assert not (tmp_path / "nosuch:").exists()  # what `dump --out s3://...` used to create (a local 's3:')


def test_export_refuses_an_unusable_parquet_url(tmp_path):
    with CacheWriter(tmp_path / "c.zarr", make_attrs_for(), layout=SMALL) as w:
        w.add(make_record(0))
    r = _cli(["export", "c.zarr", "--parquet", "nosuch://bucket/t.parquet"], tmp_path)
    assert r.exit_code == 2 and "Parquet output nosuch://bucket/t.parquet" in r.output
    assert not (tmp_path / "nosuch:").exists()


def test_recipe_with_a_url_workdir_is_refused_before_any_step(tmp_path):
    from kdcache.config import ConfigError
    from kdcache.recipes import load_recipe, plan

    recipe = load_recipe(Path(__file__).parents[2] / "pipelines" / "llava_kd.yaml")
    with pytest.raises(ConfigError, match="without its '//'"):
        plan(recipe, Path("s3://bucket/work"))  # how typer's Path hands over --workdir s3://bucket/work


def test_storage_option_flags_parse_and_merge():
    from kdcache.cache.store import merged_options, parse_storage_options

    opts = parse_storage_options(["anon=true", "max_concurrency=8", "endpoint_url=http://127.0.0.1:9000",
                                  "client_kwargs.region_name=eu-west-1"])
    assert opts == {"anon": True, "max_concurrency": 8, "endpoint_url": "http://127.0.0.1:9000",
                    "client_kwargs": {"region_name": "eu-west-1"}}
    base = {"client_kwargs": {"region_name": "us-east-1", "verify": False}, "anon": False}
    assert merged_options(base, opts)["client_kwargs"] == {"region_name": "eu-west-1", "verify": False}
    assert base["client_kwargs"]["region_name"] == "us-east-1"  # inputs untouched
    with pytest.raises(CacheLocationError, match="key=value"):
        parse_storage_options(["anon"])


def test_url_cache_round_trip_and_options_reach_the_client(s3_url, s3_server, monkeypatch):
    """Writer, reader, verify, stats on s3:// (the real server); an endpoint given only as a
    storage option works once AWS_ENDPOINT_URL is gone."""
    from kdcache.cache.stats import cache_stats
    from kdcache.cache.verify import verify_cache

    url = f"{s3_url}/c.zarr"
    records = [make_record(i) for i in range(6)]
    with CacheWriter(url, make_attrs_for(), layout=SMALL) as w:
        for r in records:
            w.add(r)
        w.write_gram(np.eye(16, dtype=np.float32))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    loc = cache_location(url, {"endpoint_url": s3_server})
    reader = CacheReader(loc)
    got = reader.read_rows(reader.parts[0], reader.parts[0].ok)
    assert [g.sample_id for g in got] == [r.sample_id for r in records]
    assert all(np.array_equal(g.topk_ids.numpy(), r.topk_ids.numpy()) for g, r in zip(got, records))
    assert verify_cache(loc).ok
    assert cache_stats(loc)["samples"] == 6


def test_url_reads_fetch_each_object_once_and_a_cache_dir_serves_the_next_epoch(s3_url, tmp_path):
    """remote.WholeObjectStore: one GET per shard however many inner chunks a block touches;
    records equal to a local copy's; with --cache-dir a second reader sends no data GETs."""
    from kdcache.cache import CacheDataset

    url = f"{s3_url}/c.zarr"
    records = [make_record(i) for i in range(30)]
    for where in (url, tmp_path / "local.zarr"):
        with CacheWriter(where, make_attrs_for(), layout=SMALL) as w:
            for r in records:
                w.add(r)
    local = CacheReader(tmp_path / "local.zarr")
    loc = cache_location(url)
    fs, root = loc.fs()
    objects = [k for k in fs.find(root) if not k.endswith("zarr.json")]
    reader = CacheReader(url, cache_dir=tmp_path / "dl")
    p = reader.parts[0]
    got = reader.read_rows(p, p.ok)
    want = local.read_rows(local.parts[0], local.parts[0].ok)
    assert [g.sample_id for g in got] == [w.sample_id for w in want]
    for g, w in zip(got, want):
        assert all(np.array_equal(getattr(g, f).float().numpy(), getattr(w, f).float().numpy())
                   for f in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass", "visual_hidden"))
    store = reader._st()["store"]
    metadata = sum(1 for k in fs.find(root) if k.endswith("zarr.json"))
    assert 0 < store.bytes_fetched and reader.requests <= len(objects) + metadata  # each object once at most
    ds = CacheDataset(url, seed=0, block_size=8, cache_dir=tmp_path / "dl")
    assert sorted(r.sample_id for r in ds) == sorted(r.sample_id for r in records)
    st = ds.reader._st()["store"]
    assert st.bytes_fetched == 0 and st.disk_hits > 0  # the second epoch came from the disk copy
