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


# ---------------------------------------------------------------------------------------------
# Errors end the output: one line after every progress bar (issue 15)


def _last_line(text: str) -> str:
    """The last line a terminal shows: tqdm redraws a bar with carriage returns on one line."""
    return text.rstrip("\n").splitlines()[-1].split("\r")[-1]


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory, synth_data):
    """Four instruct_small rows and a text-only ShareGPT row (row 2)."""
    import json

    rows = json.loads(open(synth_data["instruct_small"]).read())[:4]
    rows.insert(2, {"id": "text-1", "model": "", "conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                                                                   {"from": "gpt", "value": "5"}]})
    path = tmp_path_factory.mktemp("cli_rows") / "rows.json"
    path.write_text(json.dumps(rows))
    return path


def test_error_in_the_training_loop_is_the_last_line_after_the_bar(tmp_path, synth_data, tiny_teacher, tiny_student,
                                                                  small_rows, cli_env):
    """A cache with a NaN in one sample stops `kdcache train` at that step: the bar, closed, then the
    error naming the sample and the fix (the bar used to be redrawn after it, at exit)."""
    import json

    from kdcache.cache.reader import CacheReader
    from kdcache.cache.writer import CacheWriter
    from kdcache.config import DumpConfig
    from kdcache.dump import dump

    good = dump(DumpConfig(teacher=str(tiny_teacher), data=str(small_rows), images=str(synth_data["images_root"]),
                           out=str(tmp_path / "good.zarr"), num_workers=0))
    reader = CacheReader(good)
    recs = reader.read_range(0, 0, reader.num_samples)
    for r in recs:  # every sample damaged: the first step meets one, whatever the order
        r.tail_logmass = r.tail_logmass.clone()
        r.tail_logmass[0] = float("nan")
    w = CacheWriter(tmp_path / "nan.zarr", json.loads(json.dumps(reader.attrs)), rank=0, world_size=1)
    w.write_gram(reader.gram())
    for r in recs:
        w.add(r)
    w.close(finished=True)
    r = subprocess.run([sys.executable, "-m", "kdcache.cli", "train", "--stage", "dft", "--student", str(tiny_student),
                        "--data", str(small_rows), "--images", str(synth_data["images_root"]),
                        "--cache", str(tmp_path / "nan.zarr"), "--out", str(tmp_path / "run"), "--batch-size", "1",
                        "--max-steps", "2", "--num-workers", "0"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train dft" in r.stderr  # the bar was drawn ...
    last = _last_line(r.stderr)
    assert last.startswith("error: cache ") and "have non-finite tail_logmass" in last, last  # ... and closed before
    assert any(f"['{x.sample_id}']" in last for x in recs) and last.endswith("and re-dump the cache"), last
    assert "Traceback" not in r.stderr


def test_unexpected_error_ends_with_one_line_naming_the_sample(tmp_path, synth_data, tiny_teacher, small_rows, cli_env):
    """Any other exception: the traceback, then one error line with the sample being written and the
    way on. The fault is the one issue 15 found, put back: a checksum that refuses a text-only
    sample's zero-length visual rows."""
    harness = (
        "import sys, numpy as np\n"
        "import kdcache.cache.writer as w\n"
        "real = w.sample_checksum\n"
        "def old(row, sid, arrays):\n"
        "    for a in arrays:\n"
        "        memoryview(np.ascontiguousarray(a)).cast('B')\n"
        "    return real(row, sid, arrays)\n"
        "w.sample_checksum = old\n"
        "from kdcache.cli import app\n"
        "sys.argv = ['kdcache'] + sys.argv[1:]\n"
        "app()\n")
    r = subprocess.run([sys.executable, "-c", harness, "dump", "--teacher", str(tiny_teacher), "--data", str(small_rows),
                        "--images", str(synth_data["images_root"]), "--out", str(tmp_path / "c.zarr"),
                        "--num-workers", "0", "--batch-size", "2"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" in r.stderr and "dump rank 0" in r.stderr
    last = _last_line(r.stderr)
    assert last.startswith("error: TypeError: memoryview: cannot cast view with zeros"), last
    assert "(while writing sample 'text-1', row 2)" in last and last.endswith("rerun the same command to resume"), last


class _TruncatedImages:
    """A map-style dataset whose item decodes a truncated JPEG (its header parses)."""

    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, i):
        from kdcache.data.llava import LlavaSample, load_image

        sample = LlavaSample(id="s-9", row=9, image="t.jpg", turns=[], source="rows.json")
        return load_image(self.path, sample)


def test_a_user_error_from_a_loader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's SampleError as a RuntimeError holding the worker's traceback;
    the CLI prints the SampleError's own message (sample, fix) as the error line."""
    import io

    import torch
    from PIL import Image

    from kdcache.cli import _worker_user_error

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    loader = torch.utils.data.DataLoader(_TruncatedImages(tmp_path / "t.jpg"), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError) as e:
        next(iter(loader))
    assert str(e.value).startswith("Caught SampleError in DataLoader worker")
    msg = _worker_user_error(e.value)
    assert msg.startswith("sample 's-9' (row 9 of rows.json): corrupt_image: cannot decode image file"), msg
    assert msg.endswith("Fix: re-download or re-encode the image file (keep the JSON as it is to resume a dump or "
                        "a training run), or drop the sample"), msg
    assert _worker_user_error(RuntimeError("Caught ZeroDivisionError in DataLoader worker process 0.")) is None


def test_a_missing_file_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "--stage", "sft", "--student", ".", "--data", "data/x.json", "--images", ".",
                                 "--out", "run", "--config", "nope.yaml"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == (f"error: nope.yaml does not exist: check the path (relative paths "
                                                 f"start at {tmp_path})")
