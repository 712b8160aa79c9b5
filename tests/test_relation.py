"""The compact relation factor (kdcache.relation) against the exact logit Gram."""

from __future__ import annotations

import pytest
import torch

from kdcache import losses as L
from kdcache.relation import gram_sqrt, lm_gram, parse_lowrank, relation_factor


def _case(n=40, d=24, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g)
    return h, w


def test_full_rank_factor_reproduces_the_logit_gram():
    h, w = _case()
    r_exact = (h @ w.T) @ (h @ w.T).T  # [N, N] from the materialised logits
    f, err = relation_factor(h, gram_sqrt(lm_gram(w)), rank=64, store_dtype=torch.float32)
    assert f.shape == (40, 64) and bool((f[:, 24:] == 0).all())  # rank D = 24 < 64: the rest is zero
    torch.testing.assert_close(f @ f.T, r_exact, rtol=1e-4, atol=1e-3 * float(r_exact.abs().max()))
    assert err < 1e-5


def test_truncated_error_is_the_eckart_young_bound():
    h, w = _case()
    zc = h @ gram_sqrt(lm_gram(w))
    s = torch.linalg.svdvals(zc.double())
    for r in (2, 8, 16):
        _, err = relation_factor(h, gram_sqrt(lm_gram(w)), rank=r, store_dtype=torch.float32)
        bound = float((s[r:] ** 4).sum().sqrt() / (s ** 4).sum().sqrt())
        assert err == pytest.approx(bound, rel=1e-3, abs=1e-6)
    errs = [relation_factor(h, gram_sqrt(lm_gram(w)), rank=r, store_dtype=torch.float32)[1] for r in (2, 4, 8, 16)]
    assert errs == sorted(errs, reverse=True) and errs[0] > 1e-2


def test_bf16_rounding_is_inside_the_recorded_error_and_small():
    h, w = _case(n=64, d=32)
    f, err = relation_factor(h, gram_sqrt(lm_gram(w)), rank=64)
    assert f.dtype == torch.bfloat16
    r_exact = (h.double() @ w.double().T) @ (h.double() @ w.double().T).T
    measured = float((r_exact - f.double() @ f.double().T).norm() / r_exact.norm())
    assert measured == pytest.approx(err, rel=1e-2)
    assert 0 < err < 1e-2  # bf16 keeps the Gram within 1%


def test_relation_loss_from_the_factor_matches_the_exact_one():
    """What the trainer does with a factor: R_t = F F^T in the cosine loss."""
    h, w = _case(n=30, d=16)
    hs = torch.randn(30, 8)
    ws = torch.randn(300, 8)
    rs = L.gram_relation(hs[None], lm_gram(ws))
    rt_exact = L.gram_relation(h[None], lm_gram(w))
    f, _ = relation_factor(h, gram_sqrt(lm_gram(w)), rank=64, store_dtype=torch.float32)
    rt_factor = L.gram_relation(f[None], None)
    torch.testing.assert_close(L.relation_loss_from_grams(rs, rt_factor), L.relation_loss_from_grams(rs, rt_exact),
                               rtol=1e-4, atol=1e-5)


def test_parse_lowrank():
    assert parse_lowrank("lowrank:64") == 64
    assert parse_lowrank("hidden") is None and parse_lowrank("none") is None
    with pytest.raises(ValueError, match="rank"):
        parse_lowrank("lowrank:0")


def test_empty_sample():
    f, err = relation_factor(torch.zeros(0, 8), torch.eye(8), rank=4)
    assert f.shape == (0, 4) and err == 0.0


def test_relation_modes_parse_store_and_refuse():
    """The registry's spellings; what each mode records for a hidden dtype; what it refuses."""
    import types

    from kdcache.relation import RELATION_MODES, RelationHidden, RelationLowrank, RelationNone, parse_relation

    assert set(RELATION_MODES) == {"hidden", "none", "lowrank"}
    assert parse_relation("lowrank") == RelationLowrank(64) and parse_relation("lowrank:8").spec == "lowrank:8"
    assert parse_relation("hidden").stored("none") == RelationNone() and parse_relation("hidden").stored("bf16") == RelationHidden()
    assert parse_relation("lowrank:8").stored("bf16").factored and not RelationNone().has_targets
    for bad in ("lowrank:0", "lowrank:08", "factor"):
        with pytest.raises(ValueError, match="accepted: hidden, none, lowrank:R"):
            parse_relation(bad)
    cfg = types.SimpleNamespace(cache="c.zarr", loss=types.SimpleNamespace(gamma_rel=0.5, relation_features="hidden"))
    st = {"relation": "lowrank:8", "hidden": "bf16"}
    assert "relation_features 'hidden'" in RelationLowrank(8).train_problem(cfg, st)
    assert "needs relation targets" in RelationNone().train_problem(cfg, st)
    assert RelationHidden().train_problem(cfg, st) is None
    with pytest.raises(ValueError, match="targets 'hidden'"):
        RelationLowrank(8).check_settings(st, "here", ValueError, exact_targets=True)
