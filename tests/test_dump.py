"""The dump end to end on CPU: two real ranks, SIGKILL + resume, reruns, refusals, skips, progress.

A module-scoped reference cache (one rank, uninterrupted, in-process) is what the other runs
must reproduce. Subprocess runs use the real CLI (`python -m kdcache.cli dump ...`, torchrun for
two ranks) with --commit-every-s 0, so every batch of 2 is its own commit.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from kdcache.cache.format import CacheMismatch
from kdcache.cache.reader import CacheReader
from kdcache.cache.verify import verify_cache
from kdcache.cli import app
from kdcache.config import DumpConfig
from kdcache.dump import DumpError, dump

TOP_K = 8
BATCH = 2


def _cfg(teacher, data, images, out, **kw) -> DumpConfig:
    base = dict(top_k=TOP_K, batch_size=BATCH, num_workers=0, device="cpu")
    base.update(kw)
    return DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), **base)


def _cli_args(teacher, data, images, out, top_k=TOP_K, batch_size=BATCH) -> list[str]:
    return ["dump", "--teacher", str(teacher), "--data", str(data), "--images", str(images),
            "--out", str(out), "--top-k", str(top_k), "--batch-size", str(batch_size),
            "--num-workers", "0", "--device", "cpu"]


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: 'unchanged' means this is equal."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _committed(part_dir: Path) -> int:
    try:
        return int(json.loads((part_dir / "zarr.json").read_text())["attributes"]["committed"]["samples"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _array_paths(root: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("zarr.json")
                  if json.loads(p.read_text())["node_type"] == "array")


def _assert_same_cache(a: Path, b: Path) -> None:
    """Every array of every part (data and index), the Gram matrix and the attributes are equal."""
    arrays = _array_paths(a)
    assert arrays == _array_paths(b) and len(arrays) > 15
    for name in arrays:
        x = zarr.open_array(str(a / name), mode="r")
        y = zarr.open_array(str(b / name), mode="r")
        assert x.shape == y.shape and x.dtype == y.dtype, name
        np.testing.assert_array_equal(x[...], y[...], err_msg=name)
    ra, rb = (json.loads((p / "zarr.json").read_text())["attributes"] for p in (a, b))
    ra.pop("kdcache_version"), rb.pop("kdcache_version")
    assert ra == rb
    for part in (a / "parts").iterdir():
        if part.is_dir():
            assert (json.loads((part / "zarr.json").read_text())
                    == json.loads((b / "parts" / part.name / "zarr.json").read_text()))


def _assert_same_records(a: CacheReader, b: CacheReader, *, exact: bool) -> None:
    """Same rows, and per row the same ids, positions, top-k ids, log-probs, tail and hidden."""
    assert sorted(a.rows()) == sorted(b.rows())
    for row in a.rows():
        x, y = a.get_by_row(row), b.get_by_row(row)
        assert x.sample_id == y.sample_id
        for f in ("input_ids", "roles", "positions", "kinds", "topk_ids"):
            np.testing.assert_array_equal(getattr(x, f).numpy(), getattr(y, f).numpy(), err_msg=f"{row} {f}")
        for f in ("topk_logprobs", "tail_logmass", "visual_hidden"):
            u, v = getattr(x, f).float().numpy(), getattr(y, f).float().numpy()
            if exact:
                np.testing.assert_array_equal(u, v, err_msg=f"{row} {f}")
            else:  # another batch composition: float32 noise may move a value by one storage ulp
                np.testing.assert_allclose(u, v, rtol=2.0**-7, atol=1e-5, err_msg=f"{row} {f}")


@pytest.fixture(scope="module")
def ref_cache(tiny_teacher, synth_data, tmp_path_factory) -> Path:
    """One rank, uninterrupted: instruct_small (20 samples), top-8, bf16 hidden, fp16 log-probs."""
    out = tmp_path_factory.mktemp("dump_ref") / "ref.zarr"
    dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out))
    return out


def test_writer_thread_and_bucketing_do_not_change_the_cache(tiny_teacher, synth_data, ref_cache, tmp_path):
    """The reference is written on the writer thread with length-sorted batches; writing in the
    main thread gives the same cache array by array (batching in data order gives the same
    records up to float noise of other padded shapes, so it is compared by records)."""
    out = tmp_path / "inline.zarr"
    dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out, write_thread=False))
    _assert_same_cache(out, ref_cache)
    plain = tmp_path / "plain.zarr"
    dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], plain, bucket_batches=1))
    _assert_same_records(CacheReader(plain), CacheReader(ref_cache), exact=False)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler (inductor's CPU backend); none on PATH")
def test_compiled_teacher_gives_the_same_cache(tiny_teacher, synth_data, ref_cache, tmp_path):
    """``--compile``: the teacher's vision tower and LLM through torch.compile (dynamic lengths)
    give the eager dump's records up to float reassociation, and the cache verifies."""
    out = tmp_path / "compiled.zarr"
    dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out, compile=True))
    assert verify_cache(out).ok
    _assert_same_records(CacheReader(out), CacheReader(ref_cache), exact=False)


def test_reference_cache_is_complete(ref_cache):
    rep = verify_cache(ref_cache)
    assert rep.ok, str(rep)
    r = CacheReader(ref_cache)
    assert r.num_samples == 20 and sorted(r.rows()) == list(range(20)) and not r.skipped()
    assert r.gram().shape == (192, 192)


def test_two_ranks_open_as_one_and_equal_one_rank(tiny_teacher, synth_data, ref_cache, tmp_path, cli_env):
    out = tmp_path / "two.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", "-m", "kdcache.cli",
           *_cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out)]
    res = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    finals = [ln for ln in res.stdout.splitlines() if ln.startswith("dump done")]
    assert len(finals) == 1 and "20 samples in 2 part(s)" in finals[0], res.stdout  # rank 0, once, after both
    r2 = CacheReader(out)
    assert sorted(r2.parts) == [0, 1] and r2.attrs["settings"]["world_size"] == 2
    for rank, p in r2.parts.items():
        assert p.finished and all(int(row) % 2 == rank for row in p.cols["row"])
    _assert_same_records(r2, CacheReader(ref_cache), exact=False)
    assert np.array_equal(r2.gram(), CacheReader(ref_cache).gram())
    assert verify_cache(out).ok


def test_sigkill_then_resume_equals_uninterrupted(tiny_teacher, synth_data, ref_cache, tmp_path, cli_env):
    out = tmp_path / "killed.zarr"
    part = out / "parts" / "0"
    cmd = [sys.executable, "-m", "kdcache.cli",
           *_cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out),
           "--commit-every-s", "0"]
    env = cli_env()
    rng = random.Random(0)
    history = []
    for threshold in (2, 8, 14):  # kill once >= N samples are committed, a random moment later
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while _committed(part) < threshold and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.03))  # lands anywhere in a batch: forward, flush, commit
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0]
        assert proc.returncode == -signal.SIGKILL, f"run ended before the kill:\n{log}"
        history.append(_committed(part))
    # every kill landed mid-run, after more commits than the last
    assert history[0] >= 2 and history[0] < history[1] < history[2] < 20, history
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed after {history[-1]} rows committed earlier" in res.stdout.splitlines()[-1]
    assert not list(out.rglob("*.partial"))
    _assert_same_cache(out, ref_cache)
    _assert_same_records(CacheReader(out), CacheReader(ref_cache), exact=True)
    v = CliRunner().invoke(app, ["verify", str(out)])
    assert v.exit_code == 0 and "OK" in v.output, v.output


def test_rerun_of_finished_dump_does_nothing(tiny_teacher, synth_data, ref_cache, capsys):
    before = _snapshot(ref_cache)
    dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], ref_cache))
    lines = capsys.readouterr().out.strip().splitlines()
    assert "already complete" in lines[0] and "nothing to do" in lines[0]
    assert lines[-1].startswith("nothing to do: all 20 rows were already committed")
    assert _snapshot(ref_cache) == before


def test_other_settings_into_existing_cache_is_refused(tiny_teacher, synth_data, ref_cache):
    before = _snapshot(ref_cache)
    with pytest.raises(CacheMismatch, match=r"settings\.top_k: cache has 8, this run asks 4"):
        dump(_cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], ref_cache, top_k=4))
    res = CliRunner().invoke(app, _cli_args(tiny_teacher, synth_data["instruct_small"],
                                            synth_data["images_root"], ref_cache, batch_size=BATCH)
                             + ["--hidden", "fp16"])
    assert res.exit_code == 2 and "settings.hidden" in res.output and "unchanged" in res.output, res.output
    with pytest.raises(CacheMismatch, match=r"dataset\.(num_rows|sha256)"):
        dump(_cfg(tiny_teacher, synth_data["instruct"], synth_data["images_root"], ref_cache))
    assert _snapshot(ref_cache) == before


def test_resume_compares_content_not_path_spelling(tiny_teacher, synth_data, ref_cache, tmp_path, monkeypatch):
    """Issue 15: a dump started as ``--data ./data/x.json --teacher ./teacher`` on the dump box and
    resumed after the data and teacher moved (another machine: ``data/x.json``, ``models/teacher``)
    finishes the same cache as an uninterrupted run; a different content at the new place is
    refused naming the key, the cache untouched."""
    from kdcache.cache.writer import CacheWriter
    from kdcache.models import init_model, read_meta, write_meta

    box, train_box = tmp_path / "dump_box", tmp_path / "train_box"
    (box / "data").mkdir(parents=True)
    shutil.copy(synth_data["instruct_small"], box / "data" / "x.json")
    shutil.copytree(tiny_teacher, box / "teacher")
    out = tmp_path / "c.zarr"
    real_flush, flushes = CacheWriter.flush, []

    def crash_after_two_commits(self):
        real_flush(self)
        flushes.append(1)
        if len(flushes) == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.chdir(box)
    monkeypatch.setattr(CacheWriter, "flush", crash_after_two_commits)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dump(_cfg("./teacher", "./data/x.json", synth_data["images_root"], out, commit_every_s=0))
    monkeypatch.undo()
    done = _committed(out / "parts" / "0")
    assert 0 < done < 20

    (train_box / "models").mkdir(parents=True)
    shutil.move(box / "data", train_box / "data")
    shutil.move(box / "teacher", train_box / "models" / "teacher")
    monkeypatch.chdir(train_box)
    dump(_cfg("models/teacher", "data/x.json", synth_data["images_root"], out))
    _assert_same_records(CacheReader(out), CacheReader(ref_cache), exact=True)
    attrs = CacheReader(out).attrs
    assert attrs["dataset"]["path"] == "./data/x.json" and attrs["teacher"]["name_or_path"] == "./teacher"

    before = _snapshot(out)
    rows = json.loads((train_box / "data" / "x.json").read_text())
    rows[3]["conversations"][1]["value"] += " indeed"
    (train_box / "data" / "x.json").write_text(json.dumps(rows))
    with pytest.raises(CacheMismatch, match=r"dataset\.sha256: cache has '[0-9a-f]{64}', this run asks"):
        dump(_cfg("models/teacher", "data/x.json", synth_data["images_root"], out))
    shutil.copy(synth_data["instruct_small"], train_box / "data" / "x.json")  # the content back
    other = init_model(train_box / "models" / "other", preset="tiny-teacher", tokenizer=str(synth_data["tokenizer"]),
                       seed=5)  # same config, other weights
    write_meta(other, {**read_meta(other), "projector_trained": True, "stages": ["pt", "sft"]})
    with pytest.raises(CacheMismatch, match=r"teacher\.weights_hash: cache has"):
        dump(_cfg("models/other", "data/x.json", synth_data["images_root"], out))
    assert _snapshot(out) == before


def test_untrained_projector_is_refused_with_the_fix(tiny_student, synth_data, tmp_path):
    # tiny_student is a fresh `init-model` directory: its meta says no stage trained the projector
    with pytest.raises(DumpError, match=r"kdcache train --stage pt --student"):
        dump(_cfg(tiny_student, synth_data["instruct_small"], synth_data["images_root"], tmp_path / "c.zarr"))
    assert not (tmp_path / "c.zarr").exists()


def test_hub_id_without_network_fails_fast(synth_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    res = CliRunner().invoke(app, _cli_args("someone/nonexistent-model", synth_data["instruct_small"],
                                            synth_data["images_root"], tmp_path / "c.zarr"))
    assert time.monotonic() - t0 < 20
    assert res.exit_code == 2, res.output
    assert "someone/nonexistent-model" in res.output and "local" in res.output
    assert "--teacher /path/to/DIR" in res.output and "Traceback" not in res.output  # the flag that named it


def test_unwritable_output_fails_before_the_teacher(synth_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    # a teacher that cannot load: if it were loaded first, the error would be about it
    with pytest.raises(DumpError, match="not writable"):
        dump(_cfg("someone/nonexistent-model", synth_data["instruct_small"], synth_data["images_root"],
                  blocker / "c.zarr"))
    with pytest.raises(DumpError, match="not a directory"):
        dump(_cfg("someone/nonexistent-model", synth_data["instruct_small"], synth_data["images_root"], blocker))


def test_read_only_directory_is_refused(synth_data, tmp_path):
    """Permission bits for a normal user; as root (CI) a read-only tmpfs, which root cannot write."""
    import os
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("root, and no read-only tmpfs can be mounted here")
    try:
        with pytest.raises(DumpError, match="not writable"):
            dump(_cfg("someone/nonexistent-model", synth_data["instruct_small"], synth_data["images_root"],
                      ro / "c.zarr"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_bad_samples_are_skipped_counted_and_recorded(tiny_teacher, synth_data, tmp_path, capsys):
    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:8]
    rows[2]["image"] = "no_such_image.png"  # missing image
    rows[5]["conversations"][0]["value"] = rows[5]["conversations"][0]["value"].replace("<image>", "").strip()
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "bad.zarr"
    dump(_cfg(tiny_teacher, data, synth_data["images_root"], out))
    captured = capsys.readouterr()
    final = captured.out.strip().splitlines()[-1]
    m = re.fullmatch(
        r"dump done: 6 samples, (\d+) tokens, (\d+) positions in [\d.]+ s \([\d.]+ samples/s, \d+ tokens/s\); "
        r"wrote [\d.]+ MiB \((\d+) bytes/position\); padding [\d.]+% of the teacher's token slots; cache .*bad\.zarr: 6 samples in 1 part\(s\), [\d.]+ MiB; "
        r"skipped 2 samples: 1 missing_image, 1 no_image_token", final)
    assert m, final
    reader = CacheReader(out)
    tokens = sum(reader.get_by_row(r).num_tokens for r in reader.rows())
    positions = sum(len(reader.get_by_row(r).positions) for r in reader.rows())
    assert (int(m[1]), int(m[2])) == (tokens, positions) and int(m[3]) > 0
    assert sorted(reader.skipped()) == [(2, rows[2]["id"], "missing_image"), (5, rows[5]["id"], "no_image_token")]
    assert sorted(reader.rows()) == [0, 1, 3, 4, 6, 7]
    assert verify_cache(out).ok
    # progress: a tqdm bar on stderr with samples/s, tokens/s and an ETA
    bar = captured.err
    assert "dump rank 0" in bar and "sample/s" in bar and "tok/s=" in bar
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", bar), bar


def test_image_that_fails_to_decode_in_the_loader_is_a_recorded_skip(tiny_teacher, synth_data, tmp_path, capsys):
    """Issue 15: a truncated JPEG passes the header check and fails only when a loader worker
    decodes it. The dump commits it as a corrupt_image skip in its row's turn (it used to stop
    the dump, and a rerun stopped at it again) and says so; the other samples are dumped."""
    import io

    from PIL import Image

    images = tmp_path / "images"
    shutil.copytree(synth_data["images_root"], images)
    buf = io.BytesIO()
    Image.open(images / "train_000003.png").convert("RGB").resize((128, 128)).save(buf, format="JPEG")
    (images / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:6]
    rows[3]["image"] = "cut.jpg"
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "c.zarr"
    dump(_cfg(tiny_teacher, data, images, out, num_workers=1))  # batches of 2: rows 2 and 3 share one
    captured = capsys.readouterr()
    assert f"skipped: sample '{rows[3]['id']}' (row 3 of {data}): corrupt_image: cannot decode" in captured.err
    assert captured.out.strip().splitlines()[-1].endswith("skipped 1 sample: 1 corrupt_image")
    reader = CacheReader(out)
    assert reader.skipped() == [(3, rows[3]["id"], "corrupt_image")]
    assert sorted(reader.rows()) == [0, 1, 2, 4, 5] and verify_cache(out).ok
    dump(_cfg(tiny_teacher, data, images, out, num_workers=1))  # a rerun has nothing left to do
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("nothing to do: all 6 rows")


def test_all_skipped_dump_is_refused_and_leaves_nothing(tiny_teacher, synth_data, tmp_path):
    """The --help examples once said --images data (one level above the images): every sample
    missing. That dump must fail naming the reasons and the fix, and leave no cache that a
    corrected rerun would take as finished."""
    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:6]
    data = tmp_path / "six.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "c.zarr"
    wrong = Path(synth_data["images_root"]).parent  # the data dir, not data/images
    res = CliRunner().invoke(app, _cli_args(tiny_teacher, data, wrong, out))
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "every sample of" in last and "6 missing_image" in last and "--images must be" in last, last
    assert "Traceback" not in res.output and not out.exists()
    dump(_cfg(tiny_teacher, data, synth_data["images_root"], out))  # the corrected rerun does the work
    assert sorted(CacheReader(out).rows()) == list(range(6)) and verify_cache(out).ok


def test_top_k_above_the_vocabulary_is_refused_before_the_cache_exists(tiny_teacher, synth_data, tmp_path):
    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:4]
    data = tmp_path / "four.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "c.zarr"
    with pytest.raises(DumpError, match=r"--top-k 100000 exceeds .* vocabulary of \d+ ids"):
        dump(_cfg(tiny_teacher, data, synth_data["images_root"], out, top_k=100000))
    assert not out.exists()  # the refused setting is recorded nowhere
    dump(_cfg(tiny_teacher, data, synth_data["images_root"], out))  # a valid dump to the same --out
    assert CacheReader(out).attrs["settings"]["top_k"] == TOP_K


def test_finished_all_skipped_part_of_an_older_kdcache_is_refused_with_the_fix(tiny_teacher, synth_data, tmp_path,
                                                                              monkeypatch):
    """Before the refusal above, such a dump left a finished part of skipped rows; a corrected
    rerun then said "nothing to do". Now it says to remove the cache."""
    import kdcache.dump as D

    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:4]
    data = tmp_path / "four.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "c.zarr"
    with monkeypatch.context() as m:
        m.setattr(D, "refuse_all_skipped", lambda *a, **k: None)  # what older versions did
        dump(_cfg(tiny_teacher, data, Path(synth_data["images_root"]).parent, out))
    assert CacheReader(out).num_samples == 0 and len(CacheReader(out).skipped()) == 4
    with pytest.raises(DumpError, match=r"every row of it was skipped .* 4 of them are usable now: remove .*c\.zarr"):
        dump(_cfg(tiny_teacher, data, synth_data["images_root"], out))


def test_rows_skipped_by_the_run_that_made_a_finished_cache_but_usable_now_are_noted(tiny_teacher, synth_data,
                                                                                     tmp_path, capsys):
    rows = json.loads(Path(synth_data["instruct_small"]).read_text())[:4]
    data = tmp_path / "four.json"
    data.write_text(json.dumps(rows))
    some = tmp_path / "some_images"  # an image folder holding only the first two rows' images
    some.mkdir()
    for r in rows[:2]:
        shutil.copy(Path(synth_data["images_root"]) / r["image"], some / r["image"])
    out = tmp_path / "c.zarr"
    dump(_cfg(tiny_teacher, data, some, out))
    assert sorted(CacheReader(out).rows()) == [0, 1]
    capsys.readouterr()
    dump(_cfg(tiny_teacher, data, synth_data["images_root"], out))  # all four usable now
    err = capsys.readouterr().err
    assert "note: 2 rows the run that made" in err and "remove it and dump again" in err, err
    assert sorted(CacheReader(out).rows()) == [0, 1]  # the finished cache is kept as it is
