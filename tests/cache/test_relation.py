"""Relation modes in the cache format: ``relation: lowrank:R`` stores ``visual_factor`` [V, R] and
``index/relation_error`` instead of ``visual_hidden``; ``relation: none`` stores neither."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zarr

from kdcache.cache import CacheReader, make_attrs
from kdcache.cache.format import (
    CacheCorrupt,
    CacheFormatError,
    codec_table,
    data_array_names,
    index_arrays,
    stores_visual_hidden,
)
from kdcache.cache.stats import cache_stats
from kdcache.cache.verify import verify_cache
from kdcache.relation import gram_sqrt, relation_factors
from tests.cache.helpers import HIDDEN, SMALL, make_attrs_for, make_record, write_cache

RANK = 4


def attrs_with(relation: str, **kw) -> dict:
    a = make_attrs_for(**kw)
    settings = {**copy.deepcopy(a["settings"]), "relation": relation}
    return make_attrs(a["teacher"], a["tokenizer"], a["dataset"], settings, layout=SMALL)


def factored(records, rank=RANK, dtype=torch.bfloat16, seed=0):
    """Records with a rank-``rank`` factor of H M H^T for a random M (what the dump stores)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(50, HIDDEN, generator=g)
    c = gram_sqrt(w.T @ w)
    facs = relation_factors([r.visual_hidden for r in records], c, rank, dtype)
    for r, (f, e) in zip(records, facs):
        r.visual_hidden, r.visual_factor, r.relation_error = None, f, e
    return records


@pytest.fixture
def lowrank(tmp_path):
    recs = factored([make_record(i, n_vis=6 + i % 3) for i in range(30)])
    path = tmp_path / "lr.zarr"
    write_cache(path, recs, attrs=attrs_with(f"lowrank:{RANK}"), skips=[(100, "gone", "missing_image")])
    return path, recs


def test_layout_per_relation_mode():
    base = make_attrs_for()["settings"]
    lr = {**base, "relation": "lowrank:8"}
    assert "visual_factor" in data_array_names(lr) and "visual_hidden" not in data_array_names(lr)
    assert data_array_names(lr)[-1] == "visual_factor"  # last in checksum order
    assert "relation_error" in index_arrays(lr) and "relation_error" not in index_arrays(base)
    codecs = codec_table(lr, HIDDEN, SMALL)
    assert codecs["visual_factor"]["logical_dtype"] == "bfloat16" and "index/relation_error" in codecs
    assert not stores_visual_hidden({**base, "relation": "none"})  # none: no relation rows at all
    assert stores_visual_hidden(base)


@pytest.mark.parametrize("change, match", [
    ({"relation": "lowrank:8", "hidden": "none"}, "hidden dtype"),
    ({"relation": "lowrank:8", "targets": "hidden", "hidden": "float32"}, "stores every hidden state"),
    ({"relation": "lowrank:0"}, "settings.relation"),
])
def test_inconsistent_relation_settings_are_refused(change, match):
    a = make_attrs_for()
    with pytest.raises(CacheFormatError, match=match):
        make_attrs(a["teacher"], a["tokenizer"], a["dataset"], {**a["settings"], **change})


def test_lowrank_round_trip(lowrank):
    path, recs = lowrank
    r = CacheReader(path)
    got = r.read_range(0, 0, len(recs))
    assert len(got) == 30
    for a, b in zip(recs, got):
        assert b.visual_hidden is None and b.visual_factor.dtype == torch.bfloat16
        assert b.visual_factor.shape == (int(a.roles.eq(1).sum()), RANK)
        assert torch.equal(a.visual_factor.view(torch.int16), b.visual_factor.view(torch.int16))
        assert b.relation_error == pytest.approx(a.relation_error, rel=1e-6)  # float32 in the index
        assert 0 < b.relation_error < 1
    rep = verify_cache(path)
    assert rep.ok, str(rep)
    assert rep.samples_skipped == 1
    p = r.parts[0]
    assert p.cols["relation_error"][p.cols["status"] != 0].tolist() == [0.0]  # skipped: 0


def test_factor_is_covered_by_the_checksum(lowrank):
    path, _ = lowrank
    f = zarr.open_array(str(path / "parts/0/visual_factor"), mode="r+")
    f[2, 1] = np.uint16(f[2, 1] ^ 0x0100)  # row 2 belongs to sample s00000 (6 visual rows)
    with pytest.raises(CacheCorrupt, match="s00000.*checksum mismatch"):
        CacheReader(path).read_range(0, 0, 1)
    rep = verify_cache(path)
    assert any("s00000" in p and "checksum mismatch" in p for p in rep.problems), rep.problems


def test_verify_flags_a_bad_relation_error(lowrank):
    path, _ = lowrank
    err = zarr.open_array(str(path / "parts/0/index/relation_error"), mode="r+")
    err[3] = 2.0
    rep = verify_cache(path)
    assert any("index/relation_error of index row 3 (row 3)" in p for p in rep.problems), rep.problems


def test_writer_refuses_a_record_without_a_factor(tmp_path):
    with pytest.raises(ValueError, match="no visual_factor"):
        write_cache(tmp_path / "x.zarr", [make_record(0)], attrs=attrs_with("lowrank:4"))
    rec = factored([make_record(0)], rank=3)
    with pytest.raises(ValueError, match=r"should be \[6 visual tokens, rank 4\]"):
        write_cache(tmp_path / "y.zarr", rec, attrs=attrs_with("lowrank:4"))


def test_relation_none_stores_no_visual_rows(tmp_path):
    """relation none with a hidden dtype: the hidden states handed to the writer are not stored."""
    path = tmp_path / "none.zarr"
    write_cache(path, [make_record(i) for i in range(5)], attrs=attrs_with("none"))
    assert not (path / "parts/0/visual_hidden").exists()
    assert all(r.visual_hidden is None and r.visual_factor is None for r in CacheReader(path).read_range(0, 0, 5))
    assert verify_cache(path).ok
    assert cache_stats(path)["relation"] == {"mode": "none", "array": None, "bytes_per_sample": 0.0,
                                             "raw_bytes_per_sample": 0.0}


def test_stats_summarise_the_relation_error(lowrank):
    path, recs = lowrank
    rel = cache_stats(path)["relation"]
    errs = np.array([r.relation_error for r in recs], dtype=np.float32).astype(np.float64)
    assert rel["mode"] == f"lowrank:{RANK}" and rel["array"] == "visual_factor"
    e = rel["relation_error"]
    assert e["n"] == 30 and e["max"] == pytest.approx(errs.max()) and e["mean"] == pytest.approx(errs.mean())
    assert e["p50"] == pytest.approx(np.percentile(errs, 50)) and e["p95"] == pytest.approx(np.percentile(errs, 95))
    n_vis = sum(int(r.visual_factor.shape[0]) for r in recs)
    assert rel["raw_bytes_per_sample"] == pytest.approx(n_vis * RANK * 2 / 30)
    assert rel["bytes_per_sample"] > 0
