"""kdcache.losses, the two target modes beyond top-k: exact (teacher hidden states + LM head)
and sampled (drawn ids with counts, an unbiased forward-KL estimator).

References: ``full_divergence`` on materialised [N, V] logits (itself checked against
``topk_divergence`` at k = V, which tests/losses/test_reference.py checks against explicit
probabilities), and ``sampled_kl`` on the full logits, differentiated by autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses as L

DIVS = list(L.DIVERGENCES)
NEG_INF = float("-inf")


def draw(teacher_logits, n, g):
    """n draws with replacement per row of softmax(teacher_logits) [N, V] -> what the dump stores:
    distinct ids [N, n] sorted by count, counts [N, n], true log-probs [N, n]; padding columns
    (fewer than n distinct ids) have id 0, count 0, log-prob -inf."""
    lp = teacher_logits.double().log_softmax(-1)
    picks = torch.multinomial(lp.exp(), n, replacement=True, generator=g)  # [N, n]
    full = torch.zeros(lp.shape, dtype=torch.long).scatter_add_(1, picks, torch.ones_like(picks))  # [N, V]
    counts, ids = full.sort(-1, descending=True)
    counts, ids = counts[:, :n], ids[:, :n]
    ids = torch.where(counts > 0, ids, 0)
    return ids, counts, torch.where(counts > 0, lp.gather(1, ids), NEG_INF)


def make_case(N=11, D=6, Dt=5, V=37, dtype=torch.float64, seed=0):
    """Student hidden/head, teacher hidden/head of another width, labels and kd_mask with holes."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.7
    ht = torch.randn(N, Dt, generator=g, dtype=dtype)
    wt = torch.randn(V, Dt, generator=g, dtype=dtype) * 0.9
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 5]] = -100
    kd_mask = torch.ones(N, dtype=torch.bool)
    kd_mask[[2, 5]] = False
    return h, w, ht, wt, labels, kd_mask


def run(fn, h, w, out_weights):
    """fn(h, w) -> (ce | None, kd); values and grads of sum(ce * a) + sum(kd * b) w.r.t. h, W."""
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ce, kd = fn(hh, ww)
    a, b = out_weights
    loss = (kd * b.to(kd.dtype)).sum() + (0.0 if ce is None else (ce * a.to(ce.dtype)).sum())
    return (kd.detach(),) + (() if ce is None else (ce.detach(),)) + torch.autograd.grad(loss, [hh, ww])


def rand_out_weights(N, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, generator=g, dtype=torch.float64), torch.rand(N, generator=g, dtype=torch.float64)


def assert_all_close(got, want, rtol=1e-9, atol=1e-11):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# full_divergence


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_full_divergence_equals_topk_with_tail_at_k_equals_V(div, T):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(5, 23, generator=g, dtype=torch.float64) * 2
    z = torch.randn(5, 23, generator=g, dtype=torch.float64) * 2
    lp = t.log_softmax(-1)
    vals, ids = lp.topk(23, -1)  # k = V: every id, sorted as the cache stores them
    tail = torch.full((5,), NEG_INF, dtype=torch.float64)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    full = L.full_divergence(za, t, div, T)
    topk = L.topk_divergence(zb, ids, vals, tail, div, T)
    torch.testing.assert_close(full, topk, rtol=1e-10, atol=1e-12)
    wts = torch.rand(5, generator=g, dtype=torch.float64)
    ga, = torch.autograd.grad((full * wts).sum(), za)
    gb, = torch.autograd.grad((topk * wts).sum(), zb)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    assert (full >= -1e-12).all()


def test_full_divergence_fkl_is_kl_div_and_params_apply():
    g = torch.Generator().manual_seed(2)
    t, z = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    want = F.kl_div((z / 3).log_softmax(-1), (t / 3).log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(L.full_divergence(z, t, "fkl", 3.0), want)
    assert not torch.allclose(L.full_divergence(z, t, "jsd", beta=0.2), L.full_divergence(z, t, "jsd"))
    # a masked teacher id (-inf logit) is a zero-probability bucket: fkl stays finite
    t_masked = t.clone()
    t_masked[:, 3] = NEG_INF
    assert torch.isfinite(L.full_divergence(z, t_masked, "fkl")).all()
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        L.full_divergence(z, t[:, :5])
    with pytest.raises(ValueError, match="unknown divergence"):
        L.full_divergence(z, t, "kl")


# ---------------------------------------------------------------------------------------------
# fused_lm_losses, exact mode


def exact_fused(ht, wt, labels, kd_mask, div, T, chunk, params=None):
    return lambda hh, ww: L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, teacher_hidden=ht,
                                            teacher_lm_weight=wt, divergence=div, temperature=T,
                                            params=params, chunk_size=chunk)


def exact_plain(ht, wt, labels, kd_mask, div, T, params=None):
    def fn(hh, ww):
        z = hh @ ww.T  # [N, V] the logits the fused path never materialises
        kd = torch.where(kd_mask, L.full_divergence(z, ht @ wt.T, div, T, **(params or {})), 0.0)
        return (None if labels is None else L.token_cross_entropy(z, labels)), kd
    return fn


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("with_ce", [True, False])
def test_exact_mode_equals_full_divergence(div, T, with_ce):
    h, w, ht, wt, labels, kd_mask = make_case()
    lab = labels if with_ce else None
    ow = rand_out_weights(h.shape[0])
    got = run(exact_fused(ht, wt, lab, kd_mask, div, T, chunk=3), h, w, ow)
    want = run(exact_plain(ht, wt, lab, kd_mask, div, T), h, w, ow)
    assert_all_close(got, want)
    assert got[0][2] == 0 and got[0][5] == 0


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_exact_mode_chunked_equals_unchunked(chunk):
    h, w, ht, wt, labels, kd_mask = make_case(seed=3)
    ow = rand_out_weights(h.shape[0])
    for div in ("fkl", "jsd"):
        one = run(exact_fused(ht, wt, labels, kd_mask, div, 1.5, chunk=10**6), h, w, ow)
        many = run(exact_fused(ht, wt, labels, kd_mask, div, 1.5, chunk=chunk), h, w, ow)
        assert_all_close(many, one, rtol=1e-12, atol=1e-13)


def test_exact_mode_divergence_params_reach_it():
    h, w, ht, wt, labels, kd_mask = make_case(seed=4)
    ow = rand_out_weights(h.shape[0])
    for div, params in (("jsd", {"beta": 0.2}), ("skl", {"alpha": 0.4}), ("srkl", {"alpha": 0.3})):
        got = run(exact_fused(ht, wt, labels, kd_mask, div, 1.0, chunk=4, params=params), h, w, ow)
        assert_all_close(got, run(exact_plain(ht, wt, labels, kd_mask, div, 1.0, params), h, w, ow))


@pytest.mark.parametrize("div,T,with_ce", [("fkl", 1.0, True), ("fkl", 2.0, False), ("jsd", 2.0, True),
                                           ("rkl", 1.0, False)])
def test_exact_mode_gradcheck(div, T, with_ce):
    h, w, ht, wt, labels, kd_mask = make_case(N=6, D=3, Dt=4, V=8, seed=5)

    def f(hh, ww):
        ce, kd = L.fused_lm_losses(hh, ww, labels=labels if with_ce else None, kd_mask=kd_mask, teacher_hidden=ht,
                                   teacher_lm_weight=wt, divergence=div, temperature=T, chunk_size=4)
        return kd if ce is None else (ce, kd)

    assert torch.autograd.gradcheck(f, (h.requires_grad_(True), w.requires_grad_(True)), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("div", DIVS)
def test_exact_mode_identical_teacher_and_student_gives_zero(div):
    h, w, _, _, _, kd_mask = make_case(seed=6)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    _, kd = L.fused_lm_losses(hh, ww, kd_mask=kd_mask, teacher_hidden=h, teacher_lm_weight=w, divergence=div,
                              temperature=1.7, chunk_size=4)
    torch.testing.assert_close(kd, torch.zeros_like(kd), rtol=0, atol=1e-12)
    if div != "tvd":  # |t - s| has no gradient at 0 (its subgradient there is any value in [-1, 1])
        gh, gw = torch.autograd.grad(kd.sum(), [hh, ww])
        assert gh.abs().max() < 1e-12 and gw.abs().max() < 1e-12


def test_exact_mode_rows_without_targets_may_hold_junk():
    h, w, ht, wt, labels, kd_mask = make_case(seed=7)
    junk = ht.clone()
    junk[2] = float("nan")
    junk[5] = float("inf")
    ow = rand_out_weights(h.shape[0])
    got = run(exact_fused(junk, wt, labels, kd_mask, "jsd", 1.0, chunk=3), h, w, ow)
    assert_all_close(got, run(exact_fused(ht, wt, labels, kd_mask, "jsd", 1.0, chunk=3), h, w, ow))


def test_exact_mode_bf16_teacher_and_no_grad_to_the_teacher():
    h, w, ht, wt, labels, kd_mask = make_case(N=9, D=8, Dt=12, V=60, dtype=torch.float32, seed=8)
    htb, wtb = ht.bfloat16().requires_grad_(True), wt.bfloat16()
    hh = h.clone().requires_grad_(True)
    ce, kd = L.fused_lm_losses(hh, w, labels=labels, kd_mask=kd_mask, teacher_hidden=htb, teacher_lm_weight=wtb,
                               chunk_size=4)
    assert ce.dtype == kd.dtype == torch.float32
    (ce.sum() + kd.sum()).backward()
    assert htb.grad is None and torch.isfinite(hh.grad).all()
    # the teacher logits are a bf16 matmul: close to float32 logits of the same bf16 inputs
    ref = torch.where(kd_mask, L.full_divergence(h @ w.T, htb.detach().float() @ wtb.float().T), 0.0)
    torch.testing.assert_close(kd, ref, rtol=0.02, atol=0.02)


def test_exact_mode_errors():
    h, w, ht, wt, _, kd_mask = make_case(seed=9)
    ids = torch.zeros(h.shape[0], 2, dtype=torch.long)
    with pytest.raises(ValueError, match="both teacher_hidden"):
        L.fused_lm_losses(h, w, teacher_hidden=ht)
    with pytest.raises(ValueError, match="exclude topk_ids"):
        L.fused_lm_losses(h, w, teacher_hidden=ht, teacher_lm_weight=wt, topk_ids=ids, topk_logprobs=ids.double())
    with pytest.raises(ValueError, match="student's V"):
        L.fused_lm_losses(h, w, teacher_hidden=ht, teacher_lm_weight=wt[:-1])
    with pytest.raises(ValueError, match=r"\[N, D_t\]"):
        L.fused_lm_losses(h, w, teacher_hidden=ht[:-1], teacher_lm_weight=wt)
    with pytest.raises(ValueError, match="kd_mask"):
        L.fused_lm_losses(h, w, teacher_hidden=ht, teacher_lm_weight=wt, kd_mask=kd_mask[:3])


# ---------------------------------------------------------------------------------------------
# sampled_kl and fused_lm_losses, sampled mode


def test_sampled_kl_hand_computation_and_padding():
    z = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    ids = torch.tensor([[3, 0, 0], [2, 0, 0]])
    counts = torch.tensor([[3, 1, 0], [0, 0, 0]])  # row 0: one padding column; row 1: no draws
    lps = torch.tensor([[-0.2, -1.9, NEG_INF], [NEG_INF, NEG_INF, NEG_INF]], dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    got = L.sampled_kl(zz, ids, counts, lps, temperature=2.0)
    ls = (z[0] / 2).log_softmax(-1)
    want0 = 0.75 * (-0.2 - ls[3]) + 0.25 * (-1.9 - ls[0])
    torch.testing.assert_close(got, torch.stack([want0, torch.zeros((), dtype=torch.float64)]))
    grad, = torch.autograd.grad(got.sum(), zz)
    s = ls.exp()
    torch.testing.assert_close(grad[0], (s - torch.tensor([0.25, 0, 0, 0.75], dtype=torch.float64)) / 2)
    assert (grad[1] == 0).all()
    # a padding column's id and log-prob never matter, whatever they hold
    ids2, lps2 = ids.clone(), lps.clone()
    ids2[0, 2] = 1
    lps2[0, 2] = 5.0
    torch.testing.assert_close(L.sampled_kl(z, ids2, counts, lps2, 2.0), got.detach(), rtol=0, atol=0)


def test_sampled_kl_errors():
    z = torch.zeros(2, 5)
    ids = torch.zeros(2, 3, dtype=torch.long)
    lps = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="negative counts at rows \\[1\\]"):
        L.sampled_kl(z, ids, torch.tensor([[1, 0, 0], [2, -1, 0]]), lps)
    with pytest.raises(ValueError, match="integer"):
        L.sampled_kl(z, ids, torch.ones(2, 3), lps)
    with pytest.raises(ValueError, match=r"\[N, n\]"):
        L.sampled_kl(z, ids, torch.ones(2, 2, dtype=torch.long), lps)


def sampled_case(N=11, V=37, n=12, seed=0):
    h, w, ht, wt, labels, kd_mask = make_case(N=N, V=V, seed=seed)
    ids, counts, lps = draw(ht @ wt.T, n, torch.Generator().manual_seed(seed + 100))
    assert (counts == 0).any(), "the case must exercise padding columns"
    counts[3] = 0  # a row with a KD target but no draws: loss 0
    return h, w, labels, kd_mask, ids, counts, lps


def sampled_fused(labels, kd_mask, ids, counts, lps, T, chunk):
    return lambda hh, ww: L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, topk_ids=ids,
                                            topk_logprobs=lps, sample_counts=counts, temperature=T, chunk_size=chunk)


def sampled_plain(labels, kd_mask, ids, counts, lps, T):
    def fn(hh, ww):
        z = hh @ ww.T  # [N, V]
        kd = torch.where(kd_mask, L.sampled_kl(z, ids, counts, lps, T), 0.0)
        return (None if labels is None else L.token_cross_entropy(z, labels)), kd
    return fn


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("with_ce", [True, False])
def test_sampled_mode_equals_sampled_kl(T, with_ce):
    h, w, labels, kd_mask, ids, counts, lps = sampled_case()
    lab = labels if with_ce else None
    ow = rand_out_weights(h.shape[0])
    got = run(sampled_fused(lab, kd_mask, ids, counts, lps, T, chunk=3), h, w, ow)
    want = run(sampled_plain(lab, kd_mask, ids, counts, lps, T), h, w, ow)
    assert_all_close(got, want)
    assert got[0][2] == 0 and got[0][3] == 0 and got[0][5] == 0


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_sampled_mode_chunked_equals_unchunked(chunk):
    h, w, labels, kd_mask, ids, counts, lps = sampled_case(seed=1)
    ow = rand_out_weights(h.shape[0])
    one = run(sampled_fused(labels, kd_mask, ids, counts, lps, 1.0, chunk=10**6), h, w, ow)
    many = run(sampled_fused(labels, kd_mask, ids, counts, lps, 1.0, chunk=chunk), h, w, ow)
    assert_all_close(many, one, rtol=1e-12, atol=1e-13)


def test_sampled_mode_rows_without_targets_may_hold_junk_and_gradcheck():
    h, w, labels, kd_mask, ids, counts, lps = sampled_case(N=6, V=9, n=5, seed=2)
    junk_ids, junk_counts, junk_lps = ids.clone(), counts.clone(), lps.clone()
    junk_ids[2] = 10**6
    junk_counts[2] = -7
    junk_lps[5] = float("nan")
    ow = rand_out_weights(h.shape[0])
    got = run(sampled_fused(labels, kd_mask, junk_ids, junk_counts, junk_lps, 1.0, chunk=4), h, w, ow)
    assert_all_close(got, run(sampled_fused(labels, kd_mask, ids, counts, lps, 1.0, chunk=4), h, w, ow))
    f = sampled_fused(labels, kd_mask, ids, counts, lps, 1.5, chunk=4)
    assert torch.autograd.gradcheck(f, (h.requires_grad_(True), w.requires_grad_(True)), eps=1e-6, atol=1e-6)


def test_sampled_mode_errors():
    h, w, _, _, ids, counts, lps = sampled_case(seed=3)
    kw = {"topk_ids": ids, "topk_logprobs": lps, "sample_counts": counts}
    for div in ("rkl", "jsd", "tvd"):
        with pytest.raises(ValueError, match="'fkl' only"):
            L.fused_lm_losses(h, w, divergence=div, **kw)
    with pytest.raises(ValueError, match="no tail_logmass"):
        L.fused_lm_losses(h, w, tail_logmass=lps[:, 0], **kw)
    with pytest.raises(ValueError, match="needs topk_ids"):
        L.fused_lm_losses(h, w, sample_counts=counts)
    with pytest.raises(ValueError, match="must have topk_ids' shape"):
        L.fused_lm_losses(h, w, topk_ids=ids, topk_logprobs=lps, sample_counts=counts[:1])
    bad = counts.clone()
    bad[4, 0] = -1
    with pytest.raises(ValueError, match="negative counts at rows \\[4\\]"):
        L.fused_lm_losses(h, w, topk_ids=ids, topk_logprobs=lps, sample_counts=bad)


def test_sampled_estimator_is_unbiased_and_topk_is_not():
    """M independent dumps of n draws from one teacher distribution p, against one student.

    The mean of ``sampled_kl`` over the M estimates must lie within 4 standard errors (from the
    sample std) of the exact KL(p || s), and so must the mean gradient w.r.t. the logits, per
    coordinate (both deterministic under the fixed seed). Top-k renormalised -- what a cache of
    the same size without a tail gives -- misses the exact KL and its gradient by many times
    that standard error: a bias no amount of data averages away.
    """
    V, n, M, k = 50, 16, 4000, 16
    g = torch.Generator().manual_seed(0)
    t = torch.randn(V, generator=g, dtype=torch.float64)  # teacher logits: every id has p > 1e-3
    z = torch.randn(V, generator=g, dtype=torch.float64)  # student logits
    ids, counts, lps = draw(t.expand(M, V), n, g)
    drawn = torch.zeros(V, dtype=torch.bool).scatter_(0, ids[counts > 0], True)
    assert drawn.all(), "every id must be drawn somewhere, or its gradient's standard error is 0"
    assert (counts == 0).any()  # padding columns are part of the estimate

    zz = z.expand(M, V).clone().requires_grad_(True)
    est = L.sampled_kl(zz, ids, counts, lps)  # [M] one estimate per dump
    grads, = torch.autograd.grad(est.sum(), zz)  # [M, V]
    zr = z.clone().requires_grad_(True)
    exact = L.full_divergence(zr[None], t[None], "fkl")[0]
    exact_grad, = torch.autograd.grad(exact, zr)

    se = est.std() / M ** 0.5
    assert abs(est.mean() - exact) < 4 * se, (est.mean().item(), exact.item(), se.item())
    se_grad = grads.std(0) / M ** 0.5  # [V]
    assert ((grads.mean(0) - exact_grad).abs() < 4 * se_grad).all()

    vals, top = t.log_softmax(-1).topk(k)
    zt = z.clone().requires_grad_(True)
    renorm = L.topk_divergence(zt[None], top[None], vals[None], None)[0]
    renorm_grad, = torch.autograd.grad(renorm, zt)
    assert abs(renorm - exact) > 20 * se
    assert ((renorm_grad - exact_grad).abs() / se_grad).max() > 20
