"""kdcache.losses: divergences over top-k(+tail) buckets, CE, masked means, relation losses.

References here are written independently from the formulas, over explicit probabilities in
float64, never through the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses as L
from kdcache.relation import lm_gram

DIVS = list(L.DIVERGENCES)
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Independent references (probability space, float64)


def _kl(a, b):
    return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)


def ref_divergence(p, q, name, beta=0.5, alpha=0.1):
    """D(p || q) with p teacher, q student probabilities [..., B]."""
    if name == "fkl" or (name == "jsd" and beta == 0):
        return _kl(p, q)
    if name == "rkl" or (name == "jsd" and beta == 1):
        return _kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return _kl(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def coarsen(probs, ids, with_tail=True):
    """[N, V] probabilities -> [N, k(+1)] buckets (ids, then the rest) by explicit summation."""
    top = probs.gather(-1, ids)
    if not with_tail:
        return top / top.sum(-1, keepdim=True)
    in_top = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, ids, True)
    rest = torch.where(in_top, torch.zeros_like(probs), probs).sum(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def teacher_targets(t_logits, k):
    """What the dump records: top-k ids and true log-probs, tail = lse(outside) - lse(all)."""
    lp = t_logits.double().log_softmax(-1)
    vals, ids = lp.topk(k, -1)
    outside = lp.scatter(-1, ids, NEG_INF)
    tail = torch.logsumexp(outside, -1) if k < lp.shape[-1] else torch.full(lp.shape[:-1], NEG_INF, dtype=lp.dtype)
    return ids, vals, tail


def rand_case(N=6, V=17, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    return t, s


# ---------------------------------------------------------------------------------------------
# topk_divergence


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("with_tail", [True, False])
def test_k_equals_V_matches_full_divergence(div, T, with_tail):
    t, s = rand_case()
    V = t.shape[-1]
    ids, vals, tail = teacher_targets(t, V)  # the dump at T = 1, re-tempered by the loss
    s = s.clone().requires_grad_(True)
    got = L.topk_divergence(s, ids, vals, tail if with_tail else None, div, T)
    p, q = (t / T).softmax(-1), (s / T).softmax(-1)
    want = ref_divergence(p, q, div)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(got.sum(), s)
    (g_ref,) = torch.autograd.grad(want.sum(), s)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("div", DIVS)
def test_k_equals_V_empty_tail_is_exactly_zero_even_if_a_finite_tail_is_passed(div):
    t, s = rand_case(N=3, V=5)
    ids, vals, tail = teacher_targets(t, 5)
    assert torch.isneginf(tail).all()
    a = L.topk_divergence(s, ids, vals, tail, div)
    b = L.topk_divergence(s, ids, vals, torch.full_like(tail, -30.0), div)  # rounding junk at k = V
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # float32 student with its -inf tail bucket: no NaN in value or gradient
    s32 = s.float().requires_grad_(True)
    out = L.topk_divergence(s32, ids, vals.float(), tail.float(), div)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s32.grad).all()


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("with_tail", [True, False])
def test_topk_matches_reference_values_and_gradients(div, T, with_tail):
    t, s = rand_case(N=5, V=23, seed=1)
    k = 4
    ids, vals, tail = teacher_targets(t, k)
    # Reference teacher buckets: the documented re-tempering, p_b^(1/T) normalised over buckets.
    pb = coarsen(t.softmax(-1), ids, with_tail) ** (1 / T)
    pb = pb / pb.sum(-1, keepdim=True)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    got = L.topk_divergence(s1, ids, vals, tail if with_tail else None, div, T)
    want = ref_divergence(pb, coarsen((s2 / T).softmax(-1), ids, with_tail), div)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    w = torch.rand(got.shape[0], dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * w).sum(), s1)
    (g2,) = torch.autograd.grad((want * w).sum(), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-11)
    if not with_tail:  # renormalised top-k: no gradient outside the k ids
        outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
        assert (g1[outside] == 0).all()


@pytest.mark.parametrize("div", DIVS)
def test_nonnegative_and_data_processing_inequality(div):
    torch.manual_seed(0)
    for seed in range(4):
        t, s = rand_case(N=8, V=31, scale=3.0, seed=10 + seed)
        full = ref_divergence(t.softmax(-1), s.softmax(-1), div)
        for k in (1, 3, 12, 30):
            ids, vals, tail = teacher_targets(t, k)
            d = L.topk_divergence(s, ids, vals, tail, div)
            assert (d >= -1e-12).all()
            assert (d <= full + 1e-12).all(), (k, (d - full).max())
            assert (L.topk_divergence(s, ids, vals, None, div) >= -1e-12).all()


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("with_tail", [True, False])
def test_zero_when_student_equals_teacher(div, with_tail):
    torch.manual_seed(1)
    z = torch.randn(9, 50) * 3  # float32 student
    ids, vals, tail = teacher_targets(z, 7)
    d = L.topk_divergence(z, ids, vals.float(), tail.float() if with_tail else None, div)
    assert d.dtype == torch.float32
    assert d.abs().max() < 1e-6


def test_renormalised_mode_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    ids = torch.tensor([[3, 1]])
    lp = torch.tensor([[math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    t0, t1 = 0.5 / 0.8, 0.3 / 0.8
    q0 = math.exp(4) / (math.exp(4) + math.exp(2))
    q1 = 1 - q0
    fkl = t0 * math.log(t0 / q0) + t1 * math.log(t1 / q1)
    rkl = q0 * math.log(q0 / t0) + q1 * math.log(q1 / t1)
    assert L.topk_divergence(logits, ids, lp, None, "fkl").item() == pytest.approx(fkl, rel=1e-12)
    assert L.topk_divergence(logits, ids, lp, None, "rkl").item() == pytest.approx(rkl, rel=1e-12)
    assert L.topk_divergence(logits, ids, lp, None, "tvd").item() == pytest.approx(abs(t0 - q0), rel=1e-12)
    # T = 2: teacher log_softmax(lp / 2) over the ids, student softmax(z / 2) over the ids
    a0, a1 = math.sqrt(0.5), math.sqrt(0.3)
    t0, t1 = a0 / (a0 + a1), a1 / (a0 + a1)
    q0 = math.exp(2) / (math.exp(2) + math.exp(1))
    q1 = 1 - q0
    fkl2 = t0 * math.log(t0 / q0) + t1 * math.log(t1 / q1)
    assert L.topk_divergence(logits, ids, lp, None, "fkl", 2.0).item() == pytest.approx(fkl2, rel=1e-12)


def test_tail_mode_hand_computation():
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    ids = torch.tensor([[2]])
    lp = torch.tensor([[math.log(0.7)]], dtype=torch.float64)
    tail = torch.tensor([math.log(0.3)], dtype=torch.float64)
    zsum = 1 + math.e + math.e**2
    q_top, q_rest = math.e**2 / zsum, (1 + math.e) / zsum
    fkl = 0.7 * math.log(0.7 / q_top) + 0.3 * math.log(0.3 / q_rest)
    m_top, m_rest = 0.5 * 0.7 + 0.5 * q_top, 0.5 * 0.3 + 0.5 * q_rest
    jsd = 0.5 * (0.7 * math.log(0.7 / m_top) + 0.3 * math.log(0.3 / m_rest)) + 0.5 * (
        q_top * math.log(q_top / m_top) + q_rest * math.log(q_rest / m_rest))
    s_top, s_rest = 0.1 * 0.7 + 0.9 * q_top, 0.1 * 0.3 + 0.9 * q_rest
    skl = 0.7 * math.log(0.7 / s_top) + 0.3 * math.log(0.3 / s_rest)
    assert L.topk_divergence(logits, ids, lp, tail, "fkl").item() == pytest.approx(fkl, rel=1e-12)
    assert L.topk_divergence(logits, ids, lp, tail, "jsd").item() == pytest.approx(jsd, rel=1e-12)
    assert L.topk_divergence(logits, ids, lp, tail, "skl").item() == pytest.approx(skl, rel=1e-12)
    assert L.topk_divergence(logits, ids, lp, tail, "tvd").item() == pytest.approx(abs(0.7 - q_top), rel=1e-12)


def test_student_tail_keeps_precision_when_the_head_holds_nearly_all_mass():
    V = 100
    z = torch.zeros(1, V)
    z[0, 0] = 40.0  # p(head) = 1 - 99 e^-40: log(1 - sum p) is log(0) in float32
    ids = torch.tensor([[0]])
    got = L.student_bucket_logprobs(z, ids, with_tail=True)[0, 1]
    want = math.log(99) - (40 + math.log1p(99 * math.exp(-40)))
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(want, rel=1e-6)
    naive = torch.log1p(-z.log_softmax(-1)[0, 0].exp())
    assert torch.isneginf(naive)  # what the formula we avoid gives


def test_jsd_follows_trl_convention():
    t, s = rand_case(N=4, V=9, seed=3)
    ids, vals, tail = teacher_targets(t, 3)
    args = (s, ids, vals, tail)
    torch.testing.assert_close(L.topk_divergence(*args, "jsd", beta=0.0), L.topk_divergence(*args, "fkl"))
    torch.testing.assert_close(L.topk_divergence(*args, "jsd", beta=1.0), L.topk_divergence(*args, "rkl"))
    torch.testing.assert_close(L.topk_divergence(*args, "skl", alpha=0.0), L.topk_divergence(*args, "fkl"))
    # beta = 0.5 is the symmetric JSD; beta weights KL(t || m) with m = beta t + (1 - beta) s
    lt, ls = t.log_softmax(-1), s.log_softmax(-1)
    torch.testing.assert_close(L.bucket_divergence(lt, ls, "jsd"), L.bucket_divergence(ls, lt, "jsd"))
    torch.testing.assert_close(L.bucket_divergence(lt, ls, "jsd", beta=0.3),
                               L.bucket_divergence(ls, lt, "jsd", beta=0.7))
    torch.testing.assert_close(L.bucket_divergence(lt, ls, "jsd", beta=0.3),
                               ref_divergence(lt.exp(), ls.exp(), "jsd", beta=0.3))


def test_bf16_and_fp16_student_logits():
    torch.manual_seed(2)
    t = torch.randn(6, 40) * 2
    ids, vals, tail = teacher_targets(t, 5)
    for dt in (torch.bfloat16, torch.float16):
        z = (torch.randn(6, 40) * 2).to(dt).requires_grad_(True)
        for div in DIVS:
            d = L.topk_divergence(z, ids, vals.to(torch.float16), tail.float(), div)
            assert d.dtype == torch.float32
            ref = L.topk_divergence(z.detach().float(), ids, vals.to(torch.float16), tail.float(), div)
            torch.testing.assert_close(d, ref, rtol=0, atol=0)  # the upcast is the first thing done
            (g,) = torch.autograd.grad(d.sum(), z)
            assert g.dtype == dt and torch.isfinite(g.float()).all()


def test_errors_name_the_choices():
    z = torch.randn(2, 5)
    ids, vals, tail = teacher_targets(z, 2)
    with pytest.raises(ValueError, match="fkl, rkl, jsd, skl, srkl, tvd"):
        L.topk_divergence(z, ids, vals, tail, "kl")
    with pytest.raises(ValueError, match="unknown"):
        L.topk_divergence(z, ids, vals, tail, "fkl", beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        L.topk_divergence(z, ids, vals, tail, "jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        L.topk_divergence(z, ids[:1], vals[:1], tail, "fkl")
    with pytest.raises(ValueError, match="temperature"):
        L.topk_divergence(z, ids, vals, tail, "fkl", 0.0)


# ---------------------------------------------------------------------------------------------
# masked_mean, cross_entropy


def test_masked_mean():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    m = torch.tensor([True, False, True, False])
    assert L.masked_mean(v, m).item() == 2.0
    none = L.masked_mean(v, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert (v.grad == 0).all()
    # masked-out NaN / inf reach neither the value nor the gradient
    x = torch.tensor([1.0, float("nan"), float("inf"), 3.0], requires_grad=True)
    out = L.masked_mean(x * 2, torch.tensor([True, False, False, True]))
    out.backward()
    assert out.item() == 4.0
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_cross_entropy():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    got = L.cross_entropy(logits, labels)
    want = F.cross_entropy(logits.float().reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    z = torch.randn(3, 11, requires_grad=True)
    out = L.cross_entropy(z, torch.full((3,), -100))
    assert out.item() == 0.0
    out.backward()
    assert (z.grad == 0).all()
    tok = L.token_cross_entropy(logits, labels)
    assert tok.shape == (2, 5) and (tok[0, :3] == 0).all()


# ---------------------------------------------------------------------------------------------
# Relation loss


def test_relation_loss_hand_case_with_different_widths():
    ys = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # R_s = I
    yt = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])  # R_t = [[2, 1], [1, 1]]
    want = 1 - 3 / (math.sqrt(2) * math.sqrt(7))
    assert L.relation_loss(ys, yt).item() == pytest.approx(want, rel=1e-6)
    # rows normalised: Y_t -> [1, 1]/sqrt2, [0, 1]; R_t = [[1, a], [a, 1]], a = 1/sqrt2
    want_n = 1 - 2 / (math.sqrt(2) * math.sqrt(3))
    assert L.relation_loss(ys, yt, normalize=True).item() == pytest.approx(want_n, rel=1e-6)
    assert L.relation_loss(yt, yt).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_loss_properties():
    torch.manual_seed(4)
    ys, yt = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 6, 9, dtype=torch.float64)
    base = L.relation_loss(ys, yt)
    assert base.shape == (3,) and ((base >= 0) & (base <= 2)).all()
    torch.testing.assert_close(L.relation_loss(3.0 * ys, 0.5 * yt), base)  # scale invariant
    torch.testing.assert_close(L.relation_loss(ys, yt, normalize=True),
                               L.relation_loss(F.normalize(ys, dim=-1), F.normalize(yt, dim=-1)))
    # reference: one cosine over the flattened N x N matrices
    rs, rt = ys @ ys.transpose(1, 2), yt @ yt.transpose(1, 2)
    torch.testing.assert_close(base, 1 - F.cosine_similarity(rs.flatten(1), rt.flatten(1), dim=1))


@pytest.mark.parametrize("normalize", [False, True])
def test_relation_loss_mask_excludes_padded_rows(normalize):
    torch.manual_seed(5)
    ys = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    yt = torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    out = L.relation_loss(ys, yt, normalize=normalize, mask=mask)
    alone = L.relation_loss(ys[:1, :3], yt[:1, :3], normalize=normalize)
    torch.testing.assert_close(out[0], alone[0])
    assert out[1].item() == 0.0  # no visual rows: loss 0 (leave such samples out of the mean)
    out.sum().backward()
    assert torch.isfinite(ys.grad).all()
    assert (ys.grad[0, 3:] == 0).all() and (ys.grad[1] == 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_relation_over_no_visual_rows_is_exactly_zero_with_finite_gradients(normalize):
    """Issue 15: a text-only sample's relation in logit space: H [1, 0, D] -> R [1, 0, 0] -> loss 0,
    and the gradient to H and to the student's LM head (through M = W^T W) is finite (zero)."""
    h = torch.zeros(1, 0, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    r_s = L.gram_relation(h, lm_gram(w), normalize=normalize)
    r_t = L.gram_relation(torch.zeros(1, 0, 6), lm_gram(torch.randn(9, 6)), normalize=normalize)
    assert r_s.shape == r_t.shape == (1, 0, 0)
    loss = L.relation_loss_from_grams(r_s, r_t)
    assert loss.tolist() == [0.0]
    loss.sum().backward()
    assert h.grad.shape == (1, 0, 4) and w.grad is not None and (w.grad == 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_relation_from_grams_equals_materialised_logits(normalize):
    torch.manual_seed(6)
    B, N, Ds, Dt, V = 2, 5, 4, 6, 30
    hs = torch.randn(B, N, Ds, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, Ds, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(B, N, Dt, dtype=torch.float64), torch.randn(V, Dt, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, True, False]])
    m_t = lm_gram(wt)  # the cache stores this once
    torch.testing.assert_close(m_t, wt.T @ wt)
    r_s = L.gram_relation(hs, lm_gram(ws), mask=mask, normalize=normalize)
    r_t = L.gram_relation(ht, m_t, mask=mask, normalize=normalize)
    zs, zt = hs @ ws.T, ht @ wt.T  # [B, N, V]
    torch.testing.assert_close(L.gram_relation(zs, None, mask=mask, normalize=normalize), r_s)
    got = L.relation_loss_from_grams(r_s, r_t)
    want = L.relation_loss(zs, zt, normalize=normalize, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(got.sum(), [hs, ws])
    g2 = torch.autograd.grad(want.sum(), [hs, ws])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # mask given at the cosine instead of the gram: same thing
    r_s_nomask = L.gram_relation(hs.detach(), lm_gram(ws.detach()), normalize=normalize)
    r_t_nomask = L.gram_relation(ht, m_t, normalize=normalize)
    if not normalize:
        torch.testing.assert_close(L.relation_loss_from_grams(r_s_nomask, r_t_nomask, mask=mask), got.detach())


def test_gram_relation_shapes_and_errors():
    h = torch.randn(7, 3)
    assert L.gram_relation(h, torch.eye(3)).shape == (7, 7)
    with pytest.raises(ValueError, match="mask"):
        L.gram_relation(torch.randn(2, 4, 3), None, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="share"):
        L.relation_loss(torch.randn(1, 4, 3), torch.randn(1, 5, 3))
