"""kdcache.losses.fused_lm_loss: the weighted loss of the fused LM head, gradients formed in forward.

The trainer's path. Two references: the plain path (full logits = hidden @ W^T, then
``token_cross_entropy`` / ``topk_divergence`` / ``full_divergence`` / ``sampled_kl`` and
autograd), and ``fused_lm_losses`` (backward by recomputation) weighted afterwards. Values
and gradients w.r.t. hidden and W must match both, in every target mode.
"""

from __future__ import annotations

import pytest
import torch

from kdcache import losses as L

NEG_INF = float("-inf")
DIVS = list(L.DIVERGENCES)


def make_case(N=13, D=6, Dt=5, V=31, k=4, seed=0):
    """Student hidden/head, a teacher (hidden + head -> top-k, tail, draws), labels and masks with holes."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    ht = torch.randn(N, Dt, generator=g, dtype=torch.float64)
    wt = torch.randn(V, Dt, generator=g, dtype=torch.float64)
    lp = (ht @ wt.T).log_softmax(-1)  # [N, V] the teacher at T = 1
    vals, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, NEG_INF), -1)
    picks = torch.multinomial(lp.exp(), 8, replacement=True, generator=g)  # [N, 8]
    full = torch.zeros(lp.shape, dtype=torch.long).scatter_add_(1, picks, torch.ones_like(picks))
    counts, sids = full.sort(-1, descending=True)
    counts, sids = counts[:, :8], torch.where(counts[:, :8] > 0, sids[:, :8], 0)
    slps = torch.where(counts > 0, lp.gather(1, sids), NEG_INF)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 5]] = -100
    kd_mask = torch.ones(N, dtype=torch.bool)
    kd_mask[[2, 5]] = False
    wc = torch.rand(N, generator=g, dtype=torch.float64)
    wk = torch.rand(N, generator=g, dtype=torch.float64)
    targets = {
        "topk+tail": {"topk_ids": ids, "topk_logprobs": vals, "tail_logmass": tail},
        "topk": {"topk_ids": ids, "topk_logprobs": vals},
        "exact": {"teacher_hidden": ht, "teacher_lm_weight": wt},
        "sampled": {"topk_ids": sids, "topk_logprobs": slps, "sample_counts": counts},
    }
    return h, w, labels, kd_mask, targets, wc, wk


def plain_kd(z, mode, t, div, T):
    """The per-position divergence [N] on full logits z [N, V]: the reference of each mode."""
    if mode == "exact":
        return L.full_divergence(z, t["teacher_hidden"] @ t["teacher_lm_weight"].T, div, T)
    if mode == "sampled":
        return L.sampled_kl(z, t["topk_ids"], t["sample_counts"], t["topk_logprobs"], T)
    return L.topk_divergence(z, t["topk_ids"], t["topk_logprobs"], t.get("tail_logmass"), div, T)


CASES = ([(m, d) for m in ("topk+tail", "topk", "exact") for d in DIVS] + [("sampled", "fkl")])


@pytest.mark.parametrize("mode,div", CASES)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_equals_plain_and_recomputing_path(mode, div, T, chunk):
    h, w, labels, kd_mask, targets, wc, wk = make_case()
    t = targets[mode]
    results = {}
    for path in ("loss", "losses", "plain"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if path == "loss":
            loss, ce, kd = L.fused_lm_loss(hh, ww, ce_weight=wc, kd_weight=wk, labels=labels, kd_mask=kd_mask,
                                           divergence=div, temperature=T, chunk_size=chunk, **t)
            assert not ce.requires_grad and not kd.requires_grad  # values for the log only
        elif path == "losses":
            ce, kd = L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, divergence=div, temperature=T,
                                       chunk_size=chunk, **t)
            loss = (wc * ce).sum() + (wk * kd).sum()
        else:
            z = hh @ ww.T  # [N, V] the logits the fused paths never hold at once
            ce = L.token_cross_entropy(z, labels)
            kd = torch.where(kd_mask, plain_kd(z, mode, t, div, T), 0.0)
            loss = (wc * ce).sum() + (wk * kd).sum()
        grads = torch.autograd.grad(loss, [hh, ww])
        results[path] = [loss.detach(), ce.detach(), kd.detach(), *grads]
    for ref in ("losses", "plain"):
        for a, b in zip(results["loss"], results[ref]):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert results["loss"][0] > 0


def test_chunked_equals_unchunked_and_bitwise_equals_recomputing_path():
    h, w, labels, kd_mask, targets, wc, wk = make_case(N=40, V=53, seed=3)
    out = []
    for chunk in (3, 7, 1000):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, *_ = L.fused_lm_loss(hh, ww, ce_weight=wc, kd_weight=wk, labels=labels, kd_mask=kd_mask,
                                   chunk_size=chunk, **targets["topk+tail"])
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
        # Same chunking, same per-chunk arithmetic: the recomputing path gives the same bits.
        h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ce, kd = L.fused_lm_losses(h2, w2, labels=labels, kd_mask=kd_mask, chunk_size=chunk, **targets["topk+tail"])
        torch.autograd.backward([ce, kd], [wc, wk])
        assert torch.equal(hh.grad, h2.grad) and torch.equal(ww.grad, w2.grad)
    for a, b in zip(out[0] + out[1], out[2] + out[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_incoming_gradient_scales_the_kept_gradients():
    """Gradient accumulation divides the loss: backward must scale what forward formed."""
    h, w, labels, kd_mask, targets, wc, wk = make_case()
    grads = []
    for scale in (1.0, 0.25):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, *_ = L.fused_lm_loss(hh, ww, ce_weight=wc, kd_weight=wk, labels=labels, kd_mask=kd_mask,
                                   **targets["exact"])
        (loss * scale + hh.sum() * 0).backward()
        grads.append((hh.grad, ww.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0] * 0.25, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1] * 0.25, rtol=1e-12, atol=0)


def test_term_left_out_of_the_loss_gets_no_gradient():
    """labels without ce_weight: CE values are returned, but only the divergence is differentiated."""
    h, w, labels, kd_mask, targets, _, wk = make_case()
    hh = h.clone().requires_grad_(True)
    loss, ce, kd = L.fused_lm_loss(hh, w, kd_weight=wk, labels=labels, kd_mask=kd_mask, **targets["topk+tail"])
    (g,) = torch.autograd.grad(loss, [hh])
    h2 = h.clone().requires_grad_(True)
    loss2, _, kd2 = L.fused_lm_loss(h2, w, kd_weight=wk, kd_mask=kd_mask, **targets["topk+tail"])
    (g2,) = torch.autograd.grad(loss2, [h2])
    torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=0)
    assert ce[kd_mask & (labels != -100)].gt(0).all() and torch.equal(kd, kd2)


def test_no_grad_and_frozen_head():
    h, w, labels, kd_mask, targets, wc, wk = make_case()
    with torch.no_grad():
        loss, _, _ = L.fused_lm_loss(h.requires_grad_(True), w, ce_weight=wc, kd_weight=wk, labels=labels,
                                       kd_mask=kd_mask, **targets["topk+tail"])
    assert not loss.requires_grad
    ref, *_ = L.fused_lm_loss(h.detach(), w, ce_weight=wc, kd_weight=wk, labels=labels, kd_mask=kd_mask,
                              **targets["topk+tail"])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    # W frozen: only hidden gets a gradient, equal to the one with W trainable.
    hh, ww = h.detach().clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, *_ = L.fused_lm_loss(hh, ww, ce_weight=wc, labels=labels)
    gh, gw = torch.autograd.grad(loss, [hh, ww])
    h2 = h.detach().clone().requires_grad_(True)
    loss2, *_ = L.fused_lm_loss(h2, w, ce_weight=wc, labels=labels)
    (gh2,) = torch.autograd.grad(loss2, [h2])
    assert torch.equal(gh, gh2) and gw.abs().sum() > 0


def test_bf16_autocast_equals_recomputing_path():
    h, w, labels, kd_mask, targets, wc, wk = make_case(N=20, V=41, seed=1)
    h, w = h.float(), w.float()
    t = {k: (v.float() if v.is_floating_point() else v) for k, v in targets["topk+tail"].items()}
    outs = []
    for path in ("loss", "losses"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if path == "loss":
                loss, *_ = L.fused_lm_loss(hh, ww, ce_weight=wc.float(), kd_weight=wk.float(), labels=labels,
                                           kd_mask=kd_mask, chunk_size=6, **t)
            else:
                ce, kd = L.fused_lm_losses(hh, ww, labels=labels, kd_mask=kd_mask, chunk_size=6, **t)
                loss = (wc.float() * ce).sum() + (wk.float() * kd).sum()
        outs.append((loss.detach(), *torch.autograd.grad(loss, [hh, ww])))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_empty_and_all_masked():
    h, w, labels, kd_mask, targets, wc, wk = make_case()
    hh, ww = h[:0].clone().requires_grad_(True), w.clone().requires_grad_(True)
    t = {k: v[:0] for k, v in targets["topk+tail"].items()}
    loss, ce, kd = L.fused_lm_loss(hh, ww, ce_weight=wc[:0], kd_weight=wk[:0], labels=labels[:0],
                                   kd_mask=kd_mask[:0], **t)
    loss.backward()
    assert loss.item() == 0 and ce.numel() == 0 and kd.numel() == 0
    assert ww.grad.abs().sum() == 0 and hh.grad.shape == (0, h.shape[1])
    hh = h.clone().requires_grad_(True)
    loss, ce, kd = L.fused_lm_loss(hh, w, ce_weight=wc, kd_weight=wk, labels=torch.full_like(labels, -100),
                                   kd_mask=torch.zeros_like(kd_mask), **targets["topk+tail"])
    loss.backward()
    assert loss.item() == 0 and hh.grad.abs().sum() == 0


def test_bad_weights_and_second_backward_are_refused():
    h, w, labels, kd_mask, targets, wc, wk = make_case()
    with pytest.raises(ValueError, match="ce_weight given but there is no CE"):
        L.fused_lm_loss(h, w, ce_weight=wc, kd_mask=kd_mask, **targets["topk"])
    with pytest.raises(ValueError, match="kd_weight given but there is no teacher target"):
        L.fused_lm_loss(h, w, kd_weight=wk, labels=labels)
    with pytest.raises(ValueError, match=r"kd_weight must be \[N\]"):
        L.fused_lm_loss(h, w, kd_weight=wk[:3], labels=labels, **targets["topk"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk'"):
        L.fused_lm_loss(h, w, ce_weight=wc, labels=labels, chunk=4)  # chunk_size is the name
    hh = h.clone().requires_grad_(True)
    loss, *_ = L.fused_lm_loss(hh, w, ce_weight=wc, labels=labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_tiny_student_tail_is_exact(dtype, T):
    """Rows whose student puts ~e^-100 (and e^-300) outside the teacher's top-k, beside ordinary
    rows in the same chunk: float32 exp underflows there, so the fused head takes those tails
    from an exact log-sum-exp; values and gradients equal the plain path's."""
    V, k, N = 40, 4, 6
    g = torch.Generator().manual_seed(7)
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    lp = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    vals, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, NEG_INF), -1)
    z[1] = z[1].scatter(0, ids[1], 100.0)  # rest mass ~ V e^-100 of the top
    z[4] = z[4].scatter(0, ids[4], 300.0 * T)  # beyond float32's range entirely
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = ids[1, 0]
    w = torch.eye(V, dtype=dtype)  # hidden @ W^T = the logits we chose
    wc = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    wk = torch.rand(N, generator=g, dtype=torch.float64).to(dtype)
    out = []
    for path in ("fused", "plain"):
        hh, ww = z.to(dtype).clone().requires_grad_(True), w.clone().requires_grad_(True)
        if path == "fused":
            loss, ce, kd = L.fused_lm_loss(hh, ww, ce_weight=wc, kd_weight=wk, labels=labels, topk_ids=ids,
                                           topk_logprobs=vals.to(dtype), tail_logmass=tail.to(dtype), temperature=T,
                                           chunk_size=4)
        else:
            logits = hh @ ww.T
            ce = L.token_cross_entropy(logits, labels)
            kd = L.topk_divergence(logits, ids, vals.to(dtype), tail.to(dtype), "fkl", T)
            loss = (wc * ce).sum() + (wk * kd).sum()
        out.append([loss.detach(), ce.detach(), kd.detach(), *torch.autograd.grad(loss, [hh, ww])])
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for a, b in zip(*out):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
    assert out[0][2][[1, 4]].gt(1.0).all()  # the teacher's tail is far from the student's: a large loss
