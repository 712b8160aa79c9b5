"""The typer CLI: help texts, version, and the foundation commands from a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kdcache import __version__
from kdcache.cli import app

COMMANDS = ["make-data", "init-model", "forward", "dump", "verify", "inspect", "export", "train", "run",
            "eval", "demo"]


def test_version_and_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_help_has_an_example(cmd):
    r = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Example" in r.output and "kdcache" in r.output


def _run(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_make_data_init_model_forward_from_the_cli(tmp_path):
    r = _run("make-data", "--out", "data", "--num-images", "10", "--num-val", "2", "--num-eval", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "instruct.json").is_file() and (tmp_path / "data" / "tokenizer").is_dir()
    r = _run("init-model", "--preset", "tiny-teacher", "--tokenizer", "data/tokenizer", "--out", "models/t",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _run("forward", "--model", "models/t", "--data", "data/instruct.json", "--images", "data/images",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "logits" in r.stdout and "loss" in r.stdout


def test_bad_model_name_is_a_clean_error(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    r = _run("dump", "--teacher", "qwen2.5-3b", "--data", "x.json", "--images", ".", "--out", "c.zarr",
             cwd=tmp_path)
    assert r.returncode == 2
    assert "init-model" in r.stderr and "Traceback" not in r.stderr
