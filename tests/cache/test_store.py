"""kdcache.cache.store: a cache argument -> a location; URLs kdcache cannot open are refused."""

from __future__ import annotations

import os
from pathlib import Path

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
    ("s3://bucket/runs/t.zarr", ["s3://bucket/runs/t.zarr", "not supported"]),
    ("gs://bucket/t.zarr", ["gs://", "not supported"]),
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
    r = _cli(args, tmp_path)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert "s3://bucket/runs/c.zarr" in last and "not supported" in last and "Traceback" not in r.output
    assert not (tmp_path / "s3:").exists()  # what `dump --out s3://...` used to create


def test_export_refuses_a_url_parquet_output(tmp_path):
    with CacheWriter(tmp_path / "c.zarr", make_attrs_for(), layout=SMALL) as w:
        w.add(make_record(0))
    r = _cli(["export", "c.zarr", "--parquet", "gs://bucket/t.parquet"], tmp_path)
    assert r.exit_code == 2 and "Parquet output gs://bucket/t.parquet" in r.output
    assert not (tmp_path / "gs:").exists()


def test_recipe_with_a_url_workdir_is_refused_before_any_step(tmp_path):
    from kdcache.config import ConfigError
    from kdcache.recipes import load_recipe, plan

    recipe = load_recipe(Path(__file__).parents[2] / "pipelines" / "llava_kd.yaml")
    with pytest.raises(ConfigError, match="without its '//'"):
        plan(recipe, Path("s3://bucket/work"))  # how typer's Path hands over --workdir s3://bucket/work
