"""Real dumps of the tiny teacher with ``--targets hidden`` and ``--targets sampled:8``: the caches
verify, a sampled rerun with the same seed is identical array by array, and a dump that dies
mid-way (after some commits) resumes to the uninterrupted cache in both modes."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache.reader import CacheReader
from kdcache.cache.verify import verify_cache
from kdcache.cache.writer import CacheWriter
from kdcache.cli import app
from kdcache.dump import DumpError, check_backend, dump
from kdcache.models import load_model
from tests.test_dump import _assert_same_cache, _cfg, _cli_args

SAMPLED = "sampled:8"


def _cli_dump(tiny_teacher, synth_data, out, *extra: str) -> None:
    # --top-k 5: used by hidden (top-5 arrays), ignored by sampled:8 (8 columns)
    res = CliRunner().invoke(app, _cli_args(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"],
                                            out, top_k=5) + ["--commit-every-s", "0", *extra])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def dumped(tiny_teacher, synth_data, tmp_path_factory) -> dict:
    """targets -> an uninterrupted CLI dump of instruct_small (20 samples)."""
    root = tmp_path_factory.mktemp("dump_targets")
    out = {}
    for targets in ("hidden", SAMPLED):
        path = root / f"{targets.replace(':', '')}.zarr"
        _cli_dump(tiny_teacher, synth_data, path, "--targets", targets, "--draw-seed", "3")
        out[targets] = path
    return out


def test_hidden_dump_verifies_and_holds_the_lm_head(dumped, tiny_teacher):
    path = dumped["hidden"]
    rep = verify_cache(path)
    assert rep.ok and rep.samples_checked == 20, str(rep)
    r = CacheReader(path)
    s = r.attrs["settings"]
    assert s["targets"] == "hidden" and s["top_k"] == 5 and "draw_seed" not in s
    model, _ = load_model(str(tiny_teacher))
    w = r.lm_head()
    assert w.dtype == torch.bfloat16 and torch.equal(w, model.lm_head.weight.detach().to(torch.bfloat16))
    rec = r.get_by_row(0)
    n_vis = int((rec.roles == 1).sum())
    assert rec.position_hidden.shape == (len(rec.positions), w.shape[1])
    assert rec.visual_hidden.shape == (n_vis, w.shape[1]) and rec.sample_counts is None
    assert not (path / "parts/0/visual_hidden").exists()  # rebuilt from position_hidden


def test_sampled_dump_verifies_and_a_rerun_is_identical(dumped, tiny_teacher, synth_data, tmp_path):
    path = dumped[SAMPLED]
    rep = verify_cache(path)
    assert rep.ok and rep.samples_checked == 20, str(rep)
    s = CacheReader(path).attrs["settings"]
    assert s["targets"] == SAMPLED and s["top_k"] == 8 and s["draw_seed"] == 3
    rec = CacheReader(path).get_by_row(4)
    assert rec.topk_ids.shape[1] == 8 and (rec.sample_counts.sum(1) == 8).all()
    again = tmp_path / "again.zarr"
    _cli_dump(tiny_teacher, synth_data, again, "--targets", SAMPLED, "--draw-seed", "3")
    _assert_same_cache(again, path)


@pytest.mark.parametrize("targets", ["hidden", SAMPLED])
def test_interrupted_dump_resumes_to_the_same_cache(dumped, tiny_teacher, synth_data, tmp_path, monkeypatch,
                                                    targets):
    """The 9th add fails (up to 8 samples committed, depending on how the length-sorted batches
    fall): the rerun keeps those, redoes the rest, and ends equal, array by array, to the
    uninterrupted dump."""
    out = tmp_path / "c.zarr"
    cfg = _cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], out, top_k=5,
               targets=targets, draw_seed=3, commit_every_s=0.0)
    add, calls = CacheWriter.add, []

    def failing_add(self, record):
        calls.append(record.row)
        if len(calls) == 9:
            raise RuntimeError("simulated crash")
        return add(self, record)

    monkeypatch.setattr(CacheWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dump(cfg)
    monkeypatch.setattr(CacheWriter, "add", add)
    assert 0 < CacheReader(out).num_samples <= 8
    dump(cfg)
    _assert_same_cache(out, dumped[targets])


def test_vllm_backend_refuses_other_targets(tiny_teacher, synth_data, tmp_path):
    for targets in ("hidden", SAMPLED):
        cfg = _cfg(tiny_teacher, synth_data["instruct_small"], synth_data["images_root"], tmp_path / "c.zarr",
                   backend="vllm", hidden="none" if targets != "hidden" else "bf16", targets=targets)
        with pytest.raises(DumpError, match=rf"--backend vllm gives top-k log-probs only .*got --targets {targets}"):
            check_backend(cfg, 1)
