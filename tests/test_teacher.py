"""Teacher records against a plain Hugging Face forward of the same tiny teacher.

The reference for everything here is ``LlavaForConditionalGeneration.forward`` on one unpadded
sample with ``output_hidden_states=True``: full-vocabulary ``log_softmax(logits)`` and
``hidden_states[-1]``. Records come from ``teacher_records`` on a right-padded batch and, through
a real dump, back from the Zarr cache via ``CacheReader``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.reader import CacheReader
from kdcache.config import DumpConfig
from kdcache.data.collate import collate
from kdcache.dump import dump
from kdcache.models import load_model
from kdcache.positions import ROLE_VISUAL, select_positions, visual_span
from kdcache.teacher import teacher_records, topk_from_hidden
from tests.helpers import llava_dataset

N_SAMPLES = 6  # samples per batch: different lengths, so the batch is padded


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    model, processor = load_model(str(tiny_teacher))
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def batch_and_refs(teacher, synth_data):
    """A padded batch of N_SAMPLES and, per sample, the plain forward's float64 log-probs [T, V],
    hidden_states[-1] [T, D] and the tokenised roles [T]."""
    model, processor = teacher
    ds = llava_dataset(model, processor, synth_data["instruct"], synth_data["images_root"], N_SAMPLES)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items, processor.tokenizer.pad_token_id)
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) > 1, "want a padded batch"
    refs = {}
    with torch.no_grad():
        for it in items:
            out = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"][None],
                        output_hidden_states=True, use_cache=False)
            refs[it["row"]] = (
                torch.log_softmax(out.logits[0].double(), dim=-1).numpy(),  # [T, V]
                out.hidden_states[-1][0].numpy(),  # [T, D]
                it["roles"].numpy(),
                it["input_ids"].numpy(),
            )
    return batch, refs


def test_hidden_states_last_is_final_normed(teacher, batch_and_refs):
    """transformers 5: ``hidden_states[-1]`` is the *final-normed* state (the LM head's input),
    not the last decoder layer's output, so the cache's visual hidden states compare to it as is."""
    model, _ = teacher
    batch, _ = batch_and_refs
    norm = model.model.language_model.norm
    seen = {}
    hook = norm.register_forward_hook(lambda mod, args, out: seen.update(pre=args[0], post=out))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"][:1], pixel_values=batch["pixel_values"][:1],
                        output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    last = out.hidden_states[-1]
    torch.testing.assert_close(last, seen["post"], rtol=0, atol=0)
    assert not torch.allclose(last, seen["pre"], atol=1e-3), "hidden_states[-1] should be post-norm"
    torch.testing.assert_close(model.lm_head(last), out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kinds", [("visual", "response"), ("prompt", "visual", "response")])
def test_full_k_records_equal_plain_forward(teacher, batch_and_refs, kinds):
    """k = V: every log-prob of every stored position is the plain forward's log_softmax, the tail
    is -inf, and the visual hidden states are hidden_states[-1] in the image span."""
    model, _ = teacher
    batch, refs = batch_and_refs
    V = model.lm_head.weight.shape[0]
    recs = teacher_records(model, batch, kinds=kinds, top_k=V, with_hidden=True, chunk_size=37)
    assert [r.row for r in recs] == batch["rows"]
    for r in recs:
        ref_lp, ref_h, roles, ids = refs[r.row]
        np.testing.assert_array_equal(r.input_ids.numpy(), ids)
        np.testing.assert_array_equal(r.roles.numpy(), roles)
        pos, kc = select_positions(roles, kinds)
        np.testing.assert_array_equal(r.positions.numpy(), pos)
        np.testing.assert_array_equal(r.kinds.numpy(), kc)
        assert len(pos) > 0
        tid = r.topk_ids.long().numpy()  # [P, V]
        assert (np.sort(tid, axis=1) == np.arange(V)).all(), "k = V ids must be a permutation"
        lp = r.topk_logprobs.numpy()
        assert (np.diff(lp, axis=1) <= 0).all(), "log-probs must be sorted, descending"
        np.testing.assert_allclose(lp, np.take_along_axis(ref_lp[pos], tid, axis=1), rtol=0, atol=2e-5)
        assert np.isneginf(r.tail_logmass.numpy()).all()
        span = visual_span(roles)
        assert len(span) == int((roles == ROLE_VISUAL).sum()) > 0
        np.testing.assert_allclose(r.visual_hidden.numpy(), ref_h[span], rtol=1e-5, atol=1e-5)


def test_small_k_is_true_topk_with_exact_tail(teacher, batch_and_refs):
    model, _ = teacher
    batch, refs = batch_and_refs
    k = 5
    recs = teacher_records(model, batch, kinds=("visual", "response"), top_k=k, with_hidden=False)
    for r in recs:
        assert r.visual_hidden is None
        ref_lp = refs[r.row][0][r.positions.long().numpy()]  # [P, V] float64
        tid = r.topk_ids.long().numpy()
        lp = r.topk_logprobs.numpy().astype(np.float64)
        # the ids are the k largest: their reference values are the k largest values, in order
        np.testing.assert_allclose(np.take_along_axis(ref_lp, tid, axis=1), lp, atol=2e-5)
        np.testing.assert_allclose(-np.sort(-ref_lp, axis=1)[:, :k], lp, atol=2e-5)
        rest = ref_lp.copy()
        np.put_along_axis(rest, tid, -np.inf, axis=1)
        ref_tail = np.log(np.exp(rest).sum(axis=1))  # log mass outside the k ids
        tail = r.tail_logmass.numpy().astype(np.float64)
        np.testing.assert_allclose(tail, ref_tail, atol=2e-5)
        np.testing.assert_allclose(np.exp(tail), 1.0 - np.exp(lp).sum(axis=1), rtol=1e-4, atol=1e-6)


def test_chunk_size_does_not_change_records(teacher, batch_and_refs):
    model, _ = teacher
    batch, _ = batch_and_refs
    a = teacher_records(model, batch, kinds=("visual", "response"), top_k=7, chunk_size=3)
    b = teacher_records(model, batch, kinds=("visual", "response"), top_k=7, chunk_size=100_000)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.topk_ids.numpy(), y.topk_ids.numpy())
        # float32 rounding of a log-softmax over other matmul shapes: relative to the values (~ -4)
        np.testing.assert_allclose(x.topk_logprobs.numpy(), y.topk_logprobs.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x.tail_logmass.numpy(), y.tail_logmass.numpy(), rtol=1e-6, atol=1e-6)


def test_topk_from_hidden_temperature_bias_and_confident_tail():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 16, generator=g)
    W = torch.randn(50, 16, generator=g)
    b = torch.randn(50, generator=g)
    ids, lps, tail = topk_from_hidden(h, W, 4, temperature=2.0, lm_bias=b, chunk_size=4)
    ref = torch.log_softmax(((h @ W.T + b) / 2.0).double(), dim=-1)
    top, idx = ref.topk(4, dim=-1)
    assert torch.equal(ids, idx)
    torch.testing.assert_close(lps.double(), top, atol=1e-5, rtol=0)
    torch.testing.assert_close(tail.double(), torch.log1p(-top.exp().sum(-1)), atol=1e-5, rtol=0)
    # one token holds all but e^-60 of the mass: log(1 - sum p) would be log(0) = -inf in float32,
    # the log-sum-exp of the rest is exact.
    V = 1000
    W = torch.zeros(V, 2)
    W[0, 0] = 60.0
    _, lp, tail = topk_from_hidden(torch.tensor([[1.0, 0.0]]), W, 1)
    expect = math.log(V - 1) - math.log(math.exp(60.0) + V - 1)
    assert math.isfinite(float(tail[0])) and abs(float(tail[0]) - expect) < 1e-4
    with pytest.raises(ValueError, match="top-k"):
        topk_from_hidden(h, W, V + 1)


# ---- through the cache -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_json(synth_data, tmp_path_factory) -> Path:
    """The first 8 instruction samples in their own file (row = index, as in the original)."""
    rows = json.loads(Path(synth_data["instruct"]).read_text())[:8]
    p = tmp_path_factory.mktemp("teacher_cache") / "instruct8.json"
    p.write_text(json.dumps(rows))
    return p


@pytest.mark.parametrize("lp_dtype,hidden,kinds", [
    ("float32", "float32", ("prompt", "visual", "response")),
    ("float16", "bf16", ("visual", "response")),
])
def test_cache_holds_the_plain_forward(teacher, tiny_teacher, synth_data, small_json, tmp_path,
                                       lp_dtype, hidden, kinds):
    """k = V dump, read back through CacheReader: log-probs at every stored position equal the
    plain forward's log_softmax (tight for float32, one float16 rounding for float16) and the
    visual hidden states equal hidden_states[-1] (float32 exact-ish, one bf16 rounding)."""
    model, processor = teacher
    V = model.lm_head.weight.shape[0]
    out = tmp_path / "c.zarr"
    dump(DumpConfig(teacher=str(tiny_teacher), data=str(small_json), images=str(synth_data["images_root"]),
                    out=str(out), top_k=V, positions=kinds, hidden=hidden, logprob_dtype=lp_dtype,
                    batch_size=3, num_workers=0, device="cpu"))
    reader = CacheReader(out)
    assert reader.k == V and reader.num_samples == 8
    ds = llava_dataset(model, processor, small_json, synth_data["images_root"], 8)
    for i in range(len(ds)):
        it = ds[i]
        rec = reader.get_by_row(it["row"])
        with torch.no_grad():
            o = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"][None],
                      output_hidden_states=True, use_cache=False)
        ref_lp = torch.log_softmax(o.logits[0].double(), dim=-1).numpy()
        ref_h = o.hidden_states[-1][0].numpy()
        roles = it["roles"].numpy()
        np.testing.assert_array_equal(rec.input_ids.numpy(), it["input_ids"].numpy())
        np.testing.assert_array_equal(rec.roles.numpy(), roles)
        pos, kc = select_positions(roles, kinds)
        np.testing.assert_array_equal(rec.positions.numpy(), pos)
        np.testing.assert_array_equal(rec.kinds.numpy(), kc)
        tid = rec.topk_ids.long().numpy()
        want = np.take_along_axis(ref_lp[pos], tid, axis=1)
        got = rec.topk_logprobs.numpy().astype(np.float64)
        assert rec.topk_logprobs.dtype == getattr(torch, lp_dtype)
        if lp_dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
        else:  # round to nearest: half an ulp (2^-11 relative), plus slack for float32 noise
            assert (np.abs(got - want) <= np.abs(want) * 2.0**-10 + 1e-5).all()
        assert np.isneginf(rec.tail_logmass.numpy()).all()
        span = visual_span(roles)
        got_h = rec.visual_hidden.float().numpy()
        if hidden == "float32":
            np.testing.assert_allclose(got_h, ref_h[span], rtol=1e-5, atol=1e-5)
        else:
            assert rec.visual_hidden.dtype == torch.bfloat16
            assert (np.abs(got_h - ref_h[span]) <= np.abs(ref_h[span]) * 2.0**-7 + 1e-6).all()


@pytest.mark.parametrize("p", [0.02, 0.06])
def test_topp_records_are_the_nucleus_with_exact_tail(teacher, batch_and_refs, p):
    """targets topp:P,K: per position the fewest top ids whose mass reaches P (at most K), padded
    with -inf after them, and the tail the exact log-mass outside the kept ids."""
    model, _ = teacher
    batch, refs = batch_and_refs
    K = 24
    recs = teacher_records(model, batch, kinds=("visual", "response"), top_k=K, with_hidden=False,
                           targets=f"topp:{p},{K}")
    counts = []
    for r in recs:
        ref_lp = refs[r.row][0][r.positions.long().numpy()]  # [P, V] float64
        srt = -np.sort(-ref_lp, axis=1)
        lp = r.topk_logprobs.numpy().astype(np.float64)  # [P, K]
        kept = np.isfinite(lp)
        c = kept.sum(1)
        counts += c.tolist()
        assert (kept == (np.arange(K)[None] < c[:, None])).all()  # kept ids first, then padding
        mass = np.cumsum(np.exp(srt[:, :K]), axis=1)  # [P, K] mass of the top j+1
        want = np.minimum((mass < p).sum(1) + 1, K)  # fewest ids reaching P, capped at K
        assert (c == want).all()
        tid = r.topk_ids.long().numpy()
        np.testing.assert_allclose(np.where(kept, lp, 0), np.where(kept, srt[:, :K], 0), atol=2e-5)
        assert (tid[~kept] == np.broadcast_to(tid[:, :1], tid.shape)[~kept]).all()  # padding repeats the first id
        rest = ref_lp.copy()
        for i in range(len(rest)):
            rest[i, tid[i, :c[i]]] = -np.inf
        np.testing.assert_allclose(r.tail_logmass.numpy(), np.log(np.exp(rest).sum(1)), atol=2e-5)
    assert 1 < np.mean(counts) < K  # the nucleus varies: neither one id nor the cap everywhere
