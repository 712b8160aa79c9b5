"""``--relation lowrank:R`` end to end: dump, verify, read, inspect, train, and the refusals.

The tiny teacher has N = 16 visual tokens per image, so ``lowrank:64`` is exact up to the storage
dtype's rounding; ``lowrank:4`` truncates and must record exactly the relative Gram error one
recomputes from a float32 hidden-state cache of the same samples. Training from a float32
``lowrank:64`` cache gives the same L_rel per step as training from the hidden-state cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache.format import CacheMismatch
from kdcache.cache.reader import CacheReader
from kdcache.cache.verify import verify_cache
from kdcache.config import ConfigError, DumpConfig, LossConfig
from kdcache.dump import dump
from kdcache.inspect_cache import inspect_cache
from kdcache.train import train
from tests.test_train import make_cfg, read_metrics
from tests.helpers import dump_small

STEPS = 4


@pytest.fixture(scope="module")
def rel_caches(tmp_path_factory, synth_data, tiny_teacher):
    root = tmp_path_factory.mktemp("relation_caches")

    def d(name, **kw):
        return dump_small(tiny_teacher, synth_data, root / name, **kw)

    return {"lr64": d("lr64.zarr", relation="lowrank:64"),
            "lr64_f32": d("lr64_f32.zarr", relation="lowrank:64", hidden="float32"),
            "lr4_f32": d("lr4_f32.zarr", relation="lowrank:4", hidden="float32"),
            "hidden_f32": d("hidden_f32.zarr", hidden="float32")}


def _records(path):
    r = CacheReader(path)
    return {rec.row: rec for rec in r.read_range(0, 0, r.num_samples)}


def test_lowrank_64_is_exact_up_to_bf16_and_verifies(rel_caches):
    path = rel_caches["lr64"]
    assert verify_cache(path).ok
    r = CacheReader(path)
    assert r.attrs["settings"]["relation"] == "lowrank:64" and r.attrs["settings"]["hidden"] == "bf16"
    assert not (Path(path) / "parts/0/visual_hidden").exists()
    recs = _records(path)
    assert len(recs) == 20
    for rec in recs.values():
        assert rec.visual_hidden is None
        assert rec.visual_factor.shape == (16, 64) and rec.visual_factor.dtype == torch.bfloat16
        assert bool((rec.visual_factor[:, 16:] == 0).all())  # N = 16 < 64: the rest is zero
        assert 0 < rec.relation_error < 0.01  # bf16 rounding only


def test_recorded_error_equals_a_recomputation_from_the_hidden_cache(rel_caches):
    """lowrank:4 (float32): the recorded error is ||R - F F^T|| / ||R|| with R = H M H^T from an
    uninterrupted float32 hidden-state cache of the same samples; lowrank:64 (float32) is exact."""
    hid, lr4, lr64 = (_records(rel_caches[k]) for k in ("hidden_f32", "lr4_f32", "lr64_f32"))
    gram = torch.as_tensor(CacheReader(rel_caches["hidden_f32"]).gram()).double()  # [D, D]
    assert set(hid) == set(lr4) == set(lr64)
    for row, h in hid.items():
        R = h.visual_hidden.double() @ gram @ h.visual_hidden.double().T  # [N, N]
        for recs, rank in ((lr4, 4), (lr64, 64)):
            f = recs[row].visual_factor.double()  # [N, rank]
            assert f.shape == (16, rank)
            err = float((R - f @ f.T).norm() / R.norm())
            assert recs[row].relation_error == pytest.approx(err, rel=1e-3, abs=1e-6)
        assert lr64[row].relation_error < 1e-5 < lr4[row].relation_error


def test_inspect_prints_the_relation_summary(rel_caches):
    out = "\n".join(inspect_cache(rel_caches["lr4_f32"]))
    errs = np.array([r.relation_error for r in _records(rel_caches["lr4_f32"]).values()])
    assert "relation   lowrank:4: visual_factor" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("relative Gram error over 20 samples"))
    assert f"max {errs.max():.3g}" in line and f"mean {errs.mean():.3g}" in line
    assert "p50" in line and "p95" in line
    assert "relation   hidden: visual_hidden" in "\n".join(inspect_cache(rel_caches["hidden_f32"]))


def test_training_from_the_factor_equals_training_from_hidden_states(tmp_path, synth_data, tiny_student, rel_caches):
    """DFT from the float32 lowrank:64 cache vs the float32 hidden-state cache: same L_rel (and every
    other term) per step, since F F^T = H M H^T up to float32 rounding."""
    runs = [read_metrics(train(make_cfg(synth_data, tiny_student, tmp_path / name, cache=str(rel_caches[key]),
                                        max_steps=STEPS, lr=1e-3)))
            for name, key in (("hidden", "hidden_f32"), ("lowrank", "lr64_f32"))]
    assert [m["step"] for m in runs[0]] == [m["step"] for m in runs[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*runs):
        # random-init Grams share a dominant direction, so 1 - cos is small: compare relatively too
        assert a["loss/rel"] > 1e-4  # a real relation term, not a zero
        assert abs(a["loss/rel"] - b["loss/rel"]) <= 1e-3 * a["loss/rel"], (a, b)
        for t in ("reg", "res", "vis", "total"):
            assert abs(a[f"loss/{t}"] - b[f"loss/{t}"]) <= 1e-4, (t, a, b)


def test_trainer_refuses_hidden_relation_features_on_a_lowrank_cache(tmp_path, synth_data, tiny_student, rel_caches):
    cfg = make_cfg(synth_data, tiny_student, tmp_path / "x", cache=str(rel_caches["lr64"]),
                   loss=LossConfig(relation_features="hidden"))
    with pytest.raises(CacheMismatch, match=r"relation_features 'hidden'.*'lowrank:64'.*relation_features: logits"):
        train(cfg)


def test_trainer_refuses_l_rel_without_relation_targets(tmp_path, synth_data, tiny_teacher, tiny_student):
    cache = dump(DumpConfig(teacher=str(tiny_teacher), data=str(synth_data["instruct_small"]),
                            images=str(synth_data["images_root"]), out=str(tmp_path / "none.zarr"), num_workers=0,
                            relation="none"))
    r = CacheReader(cache)
    assert r.attrs["settings"]["relation"] == "none" and r.attrs["settings"]["hidden"] == "bf16"
    assert all(rec.visual_hidden is None for rec in r.read_range(0, 0, 3))
    with pytest.raises(CacheMismatch, match="relation none.*loss.gamma_rel: 0"):
        train(make_cfg(synth_data, tiny_student, tmp_path / "x", cache=str(cache)))


@pytest.mark.parametrize("kw, match", [
    (dict(relation="lowrank:8", hidden="none"), "hidden is 'none'"),
    (dict(relation="lowrank:8", targets="hidden"), "targets 'hidden'"),
    (dict(relation="lowrank:0"), "not a relation mode"),
    (dict(relation="rank64"), "accepted: hidden, none, lowrank:R"),
])
def test_dump_refuses_bad_relation_settings(kw, match, tmp_path, synth_data, tiny_teacher):
    cfg = DumpConfig(teacher=str(tiny_teacher), data=str(synth_data["instruct_small"]),
                     images=str(synth_data["images_root"]), out=str(tmp_path / "c.zarr"), **kw)
    with pytest.raises(ConfigError, match=match):
        dump(cfg)
    assert not (tmp_path / "c.zarr").exists()


def test_default_relation_keeps_the_old_settings():
    from kdcache.dump import dump_settings

    base = DumpConfig(teacher="t", data="d", images="i", out="o")
    assert dump_settings(base, 1)["relation"] == "hidden"
    assert dump_settings(dataclasses.replace(base, hidden="none"), 1)["relation"] == "none"
    assert dump_settings(dataclasses.replace(base, relation="lowrank"), 1)["relation"] == "lowrank:64"


def test_cli_dump_relation_flag(tmp_path, synth_data, tiny_teacher):
    from kdcache.cli import app

    out = tmp_path / "cli.zarr"
    r = CliRunner().invoke(app, ["dump", "--teacher", str(tiny_teacher), "--data", str(synth_data["instruct_small"]),
                                 "--images", str(synth_data["images_root"]), "--out", str(out), "--num-workers", "0",
                                 "--relation", "lowrank:8"])
    assert r.exit_code == 0, r.output
    assert CacheReader(out).attrs["settings"]["relation"] == "lowrank:8"
    assert "lowrank:R" in CliRunner().invoke(app, ["dump", "--help"], env={"COLUMNS": "200"}).output


def test_vllm_hybrid_dump_stores_the_same_factor(tmp_path, synth_data, tiny_teacher):
    """--backend vllm with lowrank: the factor comes from the HF hidden states of the hybrid mode
    (``HfShapedEngine`` stands in for vLLM, as in tests/backends), equal to the HF dump's factor."""
    from kdcache.config import VllmConfig
    from kdcache.data.llava import read_llava_json
    from kdcache.backends.vllm_dump import dump_with_vllm
    from kdcache.cache.store import cache_location
    from kdcache.models import load_model
    from tests.backends.test_vllm import HfShapedEngine

    rows = json.loads(Path(synth_data["instruct"]).read_text())[:4]
    data = tmp_path / "four.json"
    data.write_text(json.dumps(rows))
    cfg = DumpConfig(teacher=str(tiny_teacher), data=str(data), images=str(synth_data["images_root"]),
                     out=str(tmp_path / "hf.zarr"), top_k=8, relation="lowrank:8", hidden="float32", batch_size=2,
                     num_workers=0, device="cpu", commit_every_s=0.0)
    dump(cfg)
    vcfg = dataclasses.replace(cfg, out=str(tmp_path / "v.zarr"), backend="vllm",
                               vllm=VllmConfig(dtype="float32", hf_batch_size=1))
    model, processor = load_model(str(tiny_teacher))
    dump_with_vllm(vcfg, cache_location(vcfg.out), read_llava_json(data), 0.0, torch.device("cpu"),
               make_engine=lambda: HfShapedEngine(model.eval(), processor))
    assert verify_cache(vcfg.out).ok
    hf, v = _records(cfg.out), _records(vcfg.out)
    assert CacheReader(vcfg.out).attrs["settings"]["relation"] == "lowrank:8"
    for row in range(4):
        a, b = hf[row].visual_factor.double(), v[row].visual_factor.double()
        # eigenvectors' signs may differ: compare the Grams
        torch.testing.assert_close(a @ a.T, b @ b.T, rtol=1e-4, atol=1e-4 * float((a @ a.T).abs().max()))
        assert v[row].relation_error == pytest.approx(hf[row].relation_error, rel=1e-2, abs=1e-6)


def test_packed_batches_carry_the_factor_and_refuse_non_finite_ones(rel_caches):
    from kdcache.train import CacheRecordError, check_packed_records, pack_records, unpack_records

    recs = list(_records(rel_caches["lr64"]).values())[:3]
    packed = pack_records(recs)
    assert "visual_factor" in packed["fields"] and "visual_hidden" not in packed["fields"]
    back = unpack_records(packed)
    assert all(torch.equal(a.visual_factor, b.visual_factor) for a, b in zip(recs, back))
    check_packed_records(packed, vocab_size=10**6, cache="c.zarr")
    packed["visual_factor"][20, 3] = float("nan")  # row 20: the second sample's (16 rows each)
    with pytest.raises(CacheRecordError, match=rf"\['{recs[1].sample_id}'\].*non-finite visual_factor"):
        check_packed_records(packed, vocab_size=10**6, cache="c.zarr")
