"""Teacher side of the target modes (issue 10): ``sample_from_hidden`` and ``teacher_records``
with ``targets="sampled:N"`` / ``"hidden"``, against the full log-softmax of a plain forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.data.collate import collate
from kdcache.models import load_model
from kdcache.positions import select_positions
from kdcache.teacher import sample_from_hidden, sample_uniforms, teacher_records
from tests.helpers import llava_dataset

KINDS = ("visual", "response")
N = 8


# ---- sample_from_hidden on a known distribution --------------------------------------------------
def _toy(D=4, V=7, seed=0):
    """One row h, head W and a bias making ids 0 and V-1 impossible (-inf logits): p float64 [V]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, D, generator=g)
    W = torch.randn(V, D, generator=g)
    bias = torch.zeros(V)
    bias[0] = bias[-1] = float("-inf")
    p = torch.softmax((h @ W.T + bias).double()[0] / 1.5, dim=-1)
    return h, W, bias, p


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    pos = p > 0
    expect = counts.sum() * p[pos]
    return float(((counts[pos] - expect) ** 2 / expect).sum())


# 99.9% quantile of chi-square with 4 degrees of freedom (5 possible ids): a fixed seed, so the
# statistic is one deterministic number; a biased sampler lands far above it
CHI2_4_999 = 18.47


def test_draws_follow_the_distribution_at_the_dump_temperature():
    h, W, bias, p = _toy()
    V = W.shape[0]
    # one row, 20000 draws: the distinct ids' counts are the empirical histogram
    n = 20000
    ids, lp, tail, counts = sample_from_hidden(h, W, n, uniforms=sample_uniforms(0, 0, 1, n), temperature=1.5,
                                               lm_bias=bias)
    hist = np.zeros(V)
    np.add.at(hist, ids[0].numpy(), counts[0].numpy())
    assert hist.sum() == n and hist[0] == 0 and hist[-1] == 0  # zero-probability ids never drawn
    assert _chi2(hist, p.numpy()) < CHI2_4_999
    # 2000 rows of 10 draws, chunked: the grouping into distinct ids per row is right too
    P, n = 2000, 10
    ids, lp, tail, counts = sample_from_hidden(h.expand(P, -1), W, n, uniforms=sample_uniforms(1, 0, P, n),
                                               temperature=1.5, lm_bias=bias, chunk_size=300)
    assert (counts.sum(1) == n).all()
    hist = np.zeros(V)
    np.add.at(hist, ids.numpy().ravel(), counts.numpy().ravel())
    assert _chi2(hist, p.numpy()) < CHI2_4_999
    # log-probs are the true ones at T = 1.5; the tail is the mass of the ids not drawn
    ref = torch.log_softmax((h @ W.T + bias).double() / 1.5, dim=-1)[0]  # [V]
    drawn = counts > 0
    torch.testing.assert_close(lp[drawn].double(), ref[ids[drawn]], atol=1e-6, rtol=0)
    mass = torch.where(drawn, lp.double().exp(), 0).sum(1)
    torch.testing.assert_close(mass + tail.double().exp(), torch.ones(P, dtype=torch.float64), atol=1e-6, rtol=0)
    # drawn ids first, distinct, sorted by log-prob; padding: id 0, -inf, count 0
    assert (drawn[:, :-1] | ~drawn[:, 1:]).all()
    assert (torch.where(drawn[:, 1:], lp[:, :-1] >= lp[:, 1:], True)).all()
    assert (ids[~drawn] == 0).all() and torch.isneginf(lp[~drawn]).all()
    for r in range(20):
        k = int(drawn[r].sum())
        assert len(set(ids[r, :k].tolist())) == k


def test_inverse_cdf_edges_never_pick_a_zero_probability_id():
    """u = 0 -> the first id of positive probability; u just below 1 (u * total may round up to
    the total) -> the last one, never the impossible ids at either end."""
    h, W, bias, _p = _toy()
    V = W.shape[0]
    u = torch.tensor([[0.0, np.nextafter(1.0, 0.0), 1.0 - 1e-17]], dtype=torch.float64)
    ids, _lp, _tail, counts = sample_from_hidden(h, W, 3, uniforms=u, lm_bias=bias, temperature=1.5)
    got = {int(i): int(c) for i, c in zip(ids[0], counts[0]) if c > 0}
    assert got == {1: 1, V - 2: 2}
    # every id drawn: the tail is exactly -inf (log of an empty sum)
    full = torch.rand(1, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, _, tail, counts = sample_from_hidden(h, W, 5000, uniforms=full, lm_bias=torch.zeros(V))
    assert int((counts > 0).sum()) == V and torch.isneginf(tail).all()
    with pytest.raises(ValueError, match=r"uniforms must be \[P=1, n=4\]"):
        sample_from_hidden(h, W, 4, uniforms=u)


def test_uniforms_depend_on_seed_and_row_only():
    a = sample_uniforms(3, 17, 5, 4)
    assert a.dtype == torch.float64 and a.shape == (5, 4)
    assert torch.equal(a, sample_uniforms(3, 17, 5, 4))
    assert torch.equal(a[:2], sample_uniforms(3, 17, 2, 4)[:2])  # a prefix of positions: same draws
    assert not torch.equal(a, sample_uniforms(3, 18, 5, 4)) and not torch.equal(a, sample_uniforms(4, 17, 5, 4))


# ---- teacher_records on the tiny teacher ---------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    model, processor = load_model(str(tiny_teacher))
    return model.eval(), processor


@pytest.fixture(scope="module")
def items(teacher, synth_data):
    model, processor = teacher
    ds = llava_dataset(model, processor, synth_data["instruct"], synth_data["images_root"], 6)
    return [ds[i] for i in range(len(ds))]


def _batch(items, processor):
    return collate(items, processor.tokenizer.pad_token_id)


def _plain(model, it):
    """Plain forward of one unpadded sample: float64 log_softmax [T, V], hidden_states[-1] [T, D]."""
    with torch.no_grad():
        o = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"][None],
                  output_hidden_states=True, use_cache=False)
    return torch.log_softmax(o.logits[0].double(), dim=-1), o.hidden_states[-1][0]


def test_sampled_records_match_the_full_log_softmax(teacher, items):
    model, processor = teacher
    recs = teacher_records(model, _batch(items, processor), kinds=KINDS, top_k=3, targets=f"sampled:{N}",
                           draw_seed=11, chunk_size=29)
    for it, r in zip(items, recs):
        ref, _ = _plain(model, it)
        pos, _ = select_positions(it["roles"].numpy(), KINDS)
        ref = ref[torch.from_numpy(pos).long()]  # [P, V]
        assert r.topk_ids.shape == (len(pos), N) and r.sample_counts.dtype == torch.int32  # top_k unused
        assert (r.sample_counts.sum(1) == N).all() and r.position_hidden is None
        drawn = r.sample_counts > 0
        ids = r.topk_ids.long()
        torch.testing.assert_close(r.topk_logprobs[drawn].double(), ref.gather(1, ids)[drawn], atol=2e-5, rtol=0)
        rest = ref.clone().scatter_(1, torch.where(drawn, ids, ids[:, :1]), float("-inf"))
        torch.testing.assert_close(r.tail_logmass.double(), torch.logsumexp(rest, dim=1), atol=2e-5, rtol=0)
        # the same draws as sample_from_hidden with this sample's own uniforms
        u = sample_uniforms(11, it["row"], len(pos), N)
        p = ref.exp()
        cdf = p.cumsum(1)
        want = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True)  # [P, N]
        for j in range(len(pos)):
            got = torch.repeat_interleave(ids[j], r.sample_counts[j].long())
            assert sorted(got.tolist()) == sorted(want[j].tolist())


def test_sampled_draws_do_not_depend_on_the_batch(teacher, items):
    model, processor = teacher
    kw = {"kinds": KINDS, "top_k": 3, "targets": f"sampled:{N}", "draw_seed": 2}
    whole = teacher_records(model, _batch(items, processor), **kw)
    split = (teacher_records(model, _batch(items[:2], processor), **kw)
             + teacher_records(model, _batch(items[2:3], processor), **kw)
             + teacher_records(model, _batch(items[3:], processor), **kw))
    for a, b in zip(whole, split):
        assert a.row == b.row
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.sample_counts, b.sample_counts)
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, atol=1e-5, rtol=0)
    other = teacher_records(model, _batch(items, processor), **{**kw, "draw_seed": 3})
    assert any(not torch.equal(a.sample_counts, b.sample_counts) for a, b in zip(whole, other))


def test_hidden_records_hold_the_final_normed_states(teacher, items):
    model, processor = teacher
    batch = _batch(items, processor)
    recs = teacher_records(model, batch, kinds=("prompt", "visual", "response"), top_k=5, targets="hidden")
    topk = teacher_records(model, batch, kinds=("prompt", "visual", "response"), top_k=5)
    for it, r, t in zip(items, recs, topk):
        _, h = _plain(model, it)
        assert r.sample_counts is None and r.position_hidden.dtype == torch.float32
        assert r.position_hidden.shape == (len(r.positions), h.shape[1])
        torch.testing.assert_close(r.position_hidden, h[r.positions.long()], atol=1e-5, rtol=1e-5)
        # the top-k arrays are topk mode's, and they follow from position_hidden and the head
        assert torch.equal(r.topk_ids, t.topk_ids)
        assert torch.equal((r.position_hidden @ model.lm_head.weight.T).argmax(1), r.topk_ids[:, 0].long())
    with pytest.raises(ValueError, match=r"sampled:N with 1 <= N <= 65535"):
        teacher_records(model, batch, kinds=KINDS, top_k=5, targets="sampled:0")


def test_hidden_mode_refuses_an_lm_head_bias(teacher, items):
    model, processor = teacher
    V = model.lm_head.weight.shape[0]
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
    try:
        with pytest.raises(ValueError, match=r"lm_head\.bias"):
            teacher_records(model, _batch(items[:1], processor), kinds=KINDS, top_k=5, targets="hidden")
    finally:
        model.lm_head.bias = None
