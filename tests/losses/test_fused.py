"""kdcache.losses.fused_lm_losses: chunked LM head + CE + divergence with its own backward.

The reference is the plain path: full logits = hidden @ W^T, then ``token_cross_entropy`` and
``topk_divergence`` differentiated by autograd. Values and gradients (hidden and W) must match.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses as L

DIVS = list(L.DIVERGENCES)
NEG_INF = float("-inf")


def make_case(N=11, D=6, V=29, k=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.7
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2  # teacher logits
    lp = t.log_softmax(-1)
    vals, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, NEG_INF), -1) if k < V else torch.full((N,), NEG_INF, dtype=lp.dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 5]] = -100
    kd_mask = torch.ones(N, dtype=torch.bool)
    kd_mask[[2, 5]] = False
    return h, w, labels, kd_mask, ids, vals, tail


def plain(h, w, labels, kd_mask, ids, vals, tail, div, T, params=None):
    z = h @ w.T  # [N, V] the full logits the fused path avoids
    ce = L.token_cross_entropy(z, labels)
    kd = torch.zeros(h.shape[0], dtype=ce.dtype)
    rows = kd_mask.nonzero().squeeze(1)
    kd = kd.index_put((rows,), L.topk_divergence(z[rows], ids[rows], vals[rows], None if tail is None else tail[rows],
                                                 div, T, **(params or {})))
    return ce, kd


def both(h, w, labels, kd_mask, ids, vals, tail, div, T, chunk, params=None):
    """(fused values, fused grads), (plain values, plain grads) for random output weights."""
    g = torch.Generator().manual_seed(123)
    gc = torch.rand(h.shape[0], generator=g, dtype=torch.float64)
    gk = torch.rand(h.shape[0], generator=g, dtype=torch.float64)
    out = []
    for fn in ("fused", "plain"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if fn == "fused":
            ce, kd = L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=vals,
                                       tail_logmass=tail, divergence=div, temperature=T, params=params,
                                       chunk_size=chunk)
        else:
            ce, kd = plain(hh, ww, labels, kd_mask, ids, vals, tail, div, T, params)
        loss = (ce * gc.to(ce.dtype)).sum() + (kd * gk.to(kd.dtype)).sum()
        out.append(((ce.detach(), kd.detach()), torch.autograd.grad(loss, [hh, ww])))
    return out


def assert_match(fused, ref, rtol=1e-9, atol=1e-11):
    (vf, gf), (vr, gr) = fused, ref
    for a, b in zip(vf + gf, vr + gr):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("with_tail", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_equals_plain_values_and_gradients(div, with_tail, T):
    h, w, labels, kd_mask, ids, vals, tail = make_case()
    fused, ref = both(h, w, labels, kd_mask, ids, vals, tail if with_tail else None, div, T, chunk=3)
    assert_match(fused, ref)
    ce, kd = fused[0]
    assert ce[1] == 0 and ce[5] == 0 and kd[2] == 0 and kd[5] == 0


def test_divergence_params_reach_the_fused_path():
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=1)
    for div, params in (("jsd", {"beta": 0.2}), ("skl", {"alpha": 0.4}), ("srkl", {"alpha": 0.3})):
        fused, ref = both(h, w, labels, kd_mask, ids, vals, tail, div, 1.0, chunk=4, params=params)
        assert_match(fused, ref)
    with pytest.raises(ValueError, match="unknown"):
        L.fused_lm_losses(h, w, topk_ids=ids, topk_logprobs=vals, divergence="fkl", params={"beta": 0.5})


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
def test_chunked_equals_unchunked(chunk):
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=2)
    one = both(h, w, labels, kd_mask, ids, vals, tail, "fkl", 1.0, chunk=10**6)[0]
    many = both(h, w, labels, kd_mask, ids, vals, tail, "fkl", 1.0, chunk=chunk)[0]
    assert_match(many, one, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("with_tail", [True, False])
def test_k_equals_V(div, with_tail):
    h, w, labels, kd_mask, ids, vals, tail = make_case(V=9, k=9, seed=3)
    assert torch.isneginf(tail).all()
    fused, ref = both(h, w, labels, kd_mask, ids, vals, tail if with_tail else None, div, 1.5, chunk=4)
    assert_match(fused, ref)
    # and it is the full divergence: compare fkl with the teacher's full distribution
    if div == "fkl":
        z = h @ w.T
        t_lp = torch.empty_like(z).scatter(-1, ids, vals)
        full = F.kl_div((z / 1.5).log_softmax(-1), (t_lp / 1.5).log_softmax(-1), log_target=True,
                        reduction="none").sum(-1)
        torch.testing.assert_close(fused[0][1], torch.where(kd_mask, full, 0.0))


def test_rows_without_targets_may_hold_junk():
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=4)
    junk_ids, junk_vals, junk_tail = ids.clone(), vals.clone(), tail.clone()
    junk_ids[2] = torch.tensor([-1, 10**6, 0, 0])  # out of range and duplicated
    junk_vals[2] = float("nan")
    junk_tail[5] = float("inf")
    fused, _ = both(h, w, labels, kd_mask, junk_ids, junk_vals, junk_tail, "rkl", 1.0, chunk=3)
    _, ref = both(h, w, labels, kd_mask, ids, vals, tail, "rkl", 1.0, chunk=3)
    assert_match(fused, ref)


def test_no_targets_at_all_gives_zeros_and_zero_gradients():
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=5)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ce, kd = L.fused_lm_losses(hh, ww, labels=torch.full_like(labels, -100), kd_mask=torch.zeros_like(kd_mask),
                               topk_ids=ids, topk_logprobs=vals, tail_logmass=tail, chunk_size=4)
    assert (ce == 0).all() and (kd == 0).all()
    loss = L.masked_mean(ce, torch.zeros_like(kd_mask)) + L.masked_mean(kd, torch.zeros_like(kd_mask))
    loss.backward()
    assert (hh.grad == 0).all() and (ww.grad == 0).all()


def test_ce_only_and_kd_only():
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=6)
    hh = h.clone().requires_grad_(True)
    ce, kd = L.fused_lm_losses(hh, w, labels=labels, chunk_size=5)
    assert kd is None
    want = F.cross_entropy(hh @ w.T, labels, ignore_index=-100)
    got = L.masked_mean(ce, labels != -100)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, hh)[0], torch.autograd.grad(want, hh)[0])
    ce, kd = L.fused_lm_losses(h, w, topk_ids=ids, topk_logprobs=vals, tail_logmass=tail, chunk_size=5)
    assert ce is None
    torch.testing.assert_close(kd, L.topk_divergence(h @ w.T, ids, vals, tail))
    with pytest.raises(ValueError, match="labels"):
        L.fused_lm_losses(h, w)


def test_frozen_head_or_frozen_hidden():
    """DPT trains the projector only: W has no grad and none is computed."""
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=7)
    hh = h.clone().requires_grad_(True)
    ce, kd = L.fused_lm_losses(hh, w, labels=labels, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=vals,
                               tail_logmass=tail, chunk_size=4)
    (ce.sum() + kd.sum()).backward()
    ce2, kd2 = plain(h.clone().requires_grad_(True), w, labels, kd_mask, ids, vals, tail, "fkl", 1.0)
    assert w.grad is None and torch.isfinite(hh.grad).all()
    ww = w.clone().requires_grad_(True)
    ce, kd = L.fused_lm_losses(h, ww, labels=labels, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=vals,
                               tail_logmass=tail, chunk_size=4)
    (ce.sum() + kd.sum()).backward()
    ww2 = w.clone().requires_grad_(True)
    ce2, kd2 = plain(h, ww2, labels, kd_mask, ids, vals, tail, "fkl", 1.0)
    (ce2.sum() + kd2.sum()).backward()
    torch.testing.assert_close(ww.grad, ww2.grad)


def test_trainer_style_reduction():
    """L = L_reg + a L_res + b L_vis from the two vectors, each a masked mean over its kind."""
    h, w, labels, kd_mask, ids, vals, tail = make_case(N=13, seed=8)
    kinds = torch.tensor([2, 2, 1, 1, 1, 2, 2, 1, 2, 2, 1, 1, 2])
    grads = []
    for fn in ("fused", "plain"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if fn == "fused":
            ce, kd = L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=vals,
                                       tail_logmass=tail, chunk_size=5)
        else:
            ce, kd = plain(hh, ww, labels, kd_mask, ids, vals, tail, "fkl", 1.0)
        total = (L.masked_mean(ce, labels != -100) + 1.0 * L.masked_mean(kd, kd_mask & (kinds == 2))
                 + 0.7 * L.masked_mean(kd, kd_mask & (kinds == 1)))
        grads.append((total.detach(),) + torch.autograd.grad(total, [hh, ww]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("div,with_tail,T", [("fkl", True, 2.0), ("jsd", False, 1.0), ("tvd", True, 1.0)])
def test_gradcheck(div, with_tail, T):
    h, w, labels, kd_mask, ids, vals, tail = make_case(N=7, D=3, V=8, k=3, seed=9)
    hh, ww = h.requires_grad_(True), w.requires_grad_(True)

    def f(hh, ww):
        ce, kd = L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=vals,
                                   tail_logmass=tail if with_tail else None, divergence=div, temperature=T,
                                   chunk_size=2)
        return ce, kd

    assert torch.autograd.gradcheck(f, (hh, ww), eps=1e-6, atol=1e-6)


def test_bf16_inputs():
    h, w, labels, kd_mask, ids, vals, tail = make_case(N=9, D=16, V=40, k=5, dtype=torch.float32, seed=10)
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    ce, kd = L.fused_lm_losses(hb, wb, labels=labels, kd_mask=kd_mask, topk_ids=ids.int(),
                               topk_logprobs=vals.half(), tail_logmass=tail.float(), chunk_size=4)
    assert ce.dtype == kd.dtype == torch.float32
    (ce.sum() + kd.sum()).backward()
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    assert torch.isfinite(hb.grad.float()).all() and torch.isfinite(wb.grad.float()).all()
    # close to the float32 plain path on the same bf16-rounded inputs (bf16 matmul rounding)
    hf, wf = hb.detach().float().requires_grad_(True), wb.detach().float().requires_grad_(True)
    ce2, kd2 = plain(hf, wf, labels, kd_mask, ids, vals.half(), tail.float(), "fkl", 1.0)
    (ce2.sum() + kd2.sum()).backward()
    torch.testing.assert_close(ce, ce2, rtol=0.02, atol=0.05)
    torch.testing.assert_close(kd, kd2, rtol=0.02, atol=0.05)
    torch.testing.assert_close(hb.grad.float(), hf.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(wb.grad.float(), wf.grad, rtol=0.05, atol=0.05)


def test_shape_errors():
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=11)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        L.fused_lm_losses(h, w[:, :3], labels=labels)
    with pytest.raises(ValueError, match="labels"):
        L.fused_lm_losses(h, w, labels=labels[:3])
    with pytest.raises(ValueError, match="topk_ids"):
        L.fused_lm_losses(h, w, topk_ids=ids[:, :2], topk_logprobs=vals)
    with pytest.raises(ValueError, match="kd_mask"):
        L.fused_lm_losses(h, w, topk_ids=ids, topk_logprobs=vals, kd_mask=kd_mask[:2])


def test_empty_batch():
    h, w, labels, kd_mask, ids, vals, tail = make_case(seed=12)
    hh, ww = h[:0].clone().requires_grad_(True), w.clone().requires_grad_(True)
    ce, kd = L.fused_lm_losses(hh, ww, labels=labels[:0], kd_mask=kd_mask[:0], topk_ids=ids[:0],
                               topk_logprobs=vals[:0], tail_logmass=tail[:0])
    assert ce.shape == kd.shape == (0,)
    (L.masked_mean(ce, labels[:0] != -100) + L.masked_mean(kd, kd_mask[:0])).backward()
    assert hh.grad.shape == (0, 6) and (ww.grad == 0).all()


def test_under_autocast_matmul_runs_in_the_autocast_dtype():
    h, w, labels, kd_mask, ids, vals, tail = make_case(N=6, D=16, V=40, k=5, dtype=torch.float32, seed=13)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, kd = L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=vals,
                                   tail_logmass=tail, chunk_size=4)
    (ce.sum() + kd.sum()).backward()
    assert ce.dtype == torch.float32 and hh.grad.dtype == ww.grad.dtype == torch.float32
    ce_b, kd_b = plain(h.bfloat16().float(), w.bfloat16().float(), labels, kd_mask, ids, vals, tail, "fkl", 1.0)
    torch.testing.assert_close(ce, ce_b, rtol=0.02, atol=0.05)
    torch.testing.assert_close(kd, kd_b, rtol=0.02, atol=0.05)
    assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()
