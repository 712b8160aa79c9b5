"""Variable-k (nucleus, ``targets topp``) targets: top-k ids padded to k with a ``topk_mask``.

The masked k+1-bucket divergence must equal the plain one on each row's valid ids alone (no
padding), the fused head must equal the masked reference in values and gradients, and with every
id of the vocabulary valid it must equal the full-vocabulary divergence.
"""

from __future__ import annotations

import pytest
import torch

from kdcache import losses as L

DIVS = list(L.DIVERGENCES)
V = 40


def nucleus_case(N=13, K=9, seed=0, V=V):
    """Teacher top-K with each row keeping its first c ids (c = 1..K), padding after: ids of the
    padding columns are arbitrary in-range ids, log-probs -inf; tails exact outside the kept ids."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    lpt = t.log_softmax(-1)
    lp, ids = lpt.topk(K, -1)
    keep = torch.randint(1, K + 1, (N,), generator=g)
    keep[0], keep[1] = K, 1
    mask = torch.arange(K).unsqueeze(0) < keep.unsqueeze(1)  # [N, K]
    tail = torch.logsumexp(lpt.scatter(-1, torch.where(mask, ids, ids[:, :1]), float("-inf")), -1)
    pad_ids = torch.randint(0, V, (N, K), generator=g)
    return z, torch.where(mask, ids, pad_ids), lp.masked_fill(~mask, float("-inf")), tail, mask


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("with_tail", [True, False])
def test_masked_equals_the_plain_divergence_on_the_valid_ids(div, with_tail):
    z, ids, lp, tail, mask = nucleus_case()
    got = L.topk_divergence(z, ids, lp, tail if with_tail else None, divergence=div, temperature=1.5, topk_mask=mask)
    for i in range(z.shape[0]):
        c = int(mask[i].sum())
        ref = L.topk_divergence(z[i:i + 1], ids[i:i + 1, :c], lp[i:i + 1, :c],
                                tail[i:i + 1] if with_tail else None, divergence=div, temperature=1.5)
        torch.testing.assert_close(got[i:i + 1], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("with_tail", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_equals_the_masked_reference(div, with_tail, T):
    z, ids, lp, tail, mask = nucleus_case(N=17, seed=1)
    g = torch.Generator().manual_seed(2)
    D = 8
    h = torch.randn(17, D, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    kd_mask = torch.rand(17, generator=g) > 0.2
    wk = torch.rand(17, generator=g, dtype=torch.float64)
    tl = tail if with_tail else None
    ref = L.topk_divergence(h @ W.T, ids, lp, tl, divergence=div, temperature=T, topk_mask=mask)
    ref = torch.where(kd_mask, ref, 0.0)
    (ref * wk).sum().backward()
    gh, gw = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    loss, _, kd = L.fused_lm_loss(h, W, kd_weight=wk, kd_mask=kd_mask, topk_ids=ids, topk_logprobs=lp,
                                  tail_logmass=tl, topk_mask=mask, divergence=div, temperature=T, chunk_size=5)
    loss.backward()
    torch.testing.assert_close(kd, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad, gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(W.grad, gw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("div", DIVS)
def test_every_id_valid_equals_the_full_divergence(div):
    """K = V with no padding (P = 1): the rest is empty and the masked k+1 buckets are the full
    distribution; rows with padding at K = V still have a rest, and the fused head agrees on both."""
    g = torch.Generator().manual_seed(3)
    N, D = 6, 8
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64)
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    lp, ids = t.log_softmax(-1).topk(V, -1)
    full_mask = torch.ones(N, V, dtype=torch.bool)
    tail = torch.full((N,), float("-inf"), dtype=torch.float64)
    got = L.topk_divergence(h @ W.T, ids, lp, tail, divergence=div, topk_mask=full_mask)
    torch.testing.assert_close(got, L.full_divergence(h @ W.T, t, divergence=div), rtol=1e-10, atol=1e-12)
    mask = full_mask.clone()
    mask[::2, V // 2:] = False  # half the rows keep half the vocabulary
    lpm = lp.masked_fill(~mask, float("-inf"))
    tailm = torch.logsumexp(lp.masked_fill(mask, float("-inf")), -1)
    hh = h.clone().requires_grad_(True)
    ref = L.topk_divergence(hh @ W.T, ids, lpm, tailm, divergence=div, topk_mask=mask)
    ref.sum().backward()
    hf = h.clone().requires_grad_(True)
    loss, _, kd = L.fused_lm_loss(hf, W, kd_weight=torch.ones(N, dtype=torch.float64), topk_ids=ids,
                                  topk_logprobs=lpm, tail_logmass=tailm, topk_mask=mask, divergence=div, chunk_size=4)
    loss.backward()
    torch.testing.assert_close(kd, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hf.grad, hh.grad, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(ref).all() and (ref[::2] > 0).all() and torch.isfinite(hf.grad).all()


def test_bad_masks_are_refused():
    z, ids, lp, tail, mask = nucleus_case()
    with pytest.raises(ValueError, match="first column valid"):
        L.topk_divergence(z, ids, lp, tail, topk_mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="bool"):
        L.topk_divergence(z, ids, lp, tail, topk_mask=mask.long())
    with pytest.raises(ValueError, match="not sampled ones"):
        L.fused_lm_losses(z.float()[:, :8], torch.randn(V, 8), topk_ids=ids, topk_logprobs=lp,
                          sample_counts=torch.ones_like(ids), topk_mask=mask)
