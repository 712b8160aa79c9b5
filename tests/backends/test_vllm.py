"""vLLM backend: converting vLLM's prompt log-probs into teacher records, against the HF records.

vLLM is not installed in CI, so the conversion is tested on outputs of vLLM's documented shape
built here from a plain Hugging Face forward of the tiny teacher: ``prompt_logprobs[j]`` holds the
top-k tokens at j given tokens < j, by rank, plus the actual token j when it ranks below k (entry
0 is None). The values are vLLM's own ``Logprob`` class when ``import vllm`` works, else a local
dataclass with the same fields (``logprob``, ``rank``, ``decoded_token``; vllm.logprobs docs).

Tolerances: the reference log-probs are the float64 log-softmax of the forward's float32 logits;
``teacher_records`` computes in float32, so log-probs and tails agree to 1e-5 (float32 rounding
of log-sum-exp over the tiny teacher's vocabulary). The tail from the head (``tail_from_head``) is exact
in float64 for the numbers given (1e-9 here), except when the head holds nearly all the mass: the
caveat, tested separately.

The dump's vLLM path (``kdcache.backends.vllm_dump.dump_with_vllm``) runs here with ``HfShapedEngine`` in place of
vLLM's engine, with and without the hybrid mode's HF hidden states, against an HF dump.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.backends import BackendUnavailable
from kdcache.backends.vllm import VllmTeacher, records_from_prompt_logprobs, tail_from_head
from kdcache.cli import app
from kdcache.data.collate import collate
from kdcache.data.llava import read_llava_json
from kdcache.models import image_token_id, load_model, num_image_tokens
from kdcache.positions import ROLE_VISUAL
from kdcache.teacher import teacher_records
from tests.helpers import llava_dataset

K = 8
KINDS = ("prompt", "visual", "response")
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if HAVE_VLLM:
    from vllm.logprobs import Logprob
else:
    @dataclass
    class Logprob:  # the fields of vllm.logprobs.Logprob (vLLM is not installed here)
        logprob: float
        rank: int | None = None
        decoded_token: str | None = None


def vllm_shaped(logp: np.ndarray, ids: np.ndarray, k: int, form: str = "logprob") -> list:
    """vLLM's ``prompt_logprobs`` for a prompt ``ids`` [T] from full log-probs ``logp`` [T, V]
    (row t = distribution of token t+1): entry j = top-k at j-1 by rank, plus token j if its rank
    is > k. ``form``: Logprob objects | flat floats | JSON dicts (string keys)."""
    out: list = [None]
    for j in range(1, len(ids)):
        row = logp[j - 1]
        order = np.argsort(-row, kind="stable")  # [V] ids by rank
        rank_of = np.empty_like(order)
        rank_of[order] = np.arange(1, len(order) + 1)
        chosen = [int(i) for i in order[:k]]
        if rank_of[ids[j]] > k:
            chosen.append(int(ids[j]))  # the actual prompt token, outside the top k
        if form == "logprob":
            out.append({i: Logprob(float(row[i]), int(rank_of[i]), None) for i in chosen})
        elif form == "flat":
            out.append({i: float(row[i]) for i in chosen})
        else:
            out.append({str(i): {"logprob": float(row[i]), "rank": int(rank_of[i])} for i in chosen})
    if form == "json":
        out = json.loads(json.dumps(out))
    return out


@pytest.fixture(scope="module")
def hf_refs(tiny_teacher, synth_data):
    """HF records (top-k K) of 4 samples in one padded batch, and per sample the plain forward's
    float64 log-probs [T, V], ids [T], roles [T]."""
    model, processor = load_model(str(tiny_teacher))
    model.eval()
    ds = llava_dataset(model, processor, synth_data["instruct"], synth_data["images_root"], 4)
    items = [ds[i] for i in range(len(ds))]
    recs = teacher_records(model, collate(items, processor.tokenizer.pad_token_id), kinds=KINDS, top_k=K,
                           with_hidden=False)
    refs = []
    with torch.no_grad():
        for it in items:
            logits = model(input_ids=it["input_ids"][None], pixel_values=it["pixel_values"][None],
                           use_cache=False).logits[0]  # [T, V]
            refs.append((torch.log_softmax(logits.double(), -1).numpy(), it["input_ids"].numpy(), it["roles"].numpy()))
    return recs, refs, int(model.lm_head.weight.shape[0])


def _convert(pl, ids, roles, rec, k=K, **kw):
    return records_from_prompt_logprobs(pl, input_ids=ids, roles=roles, sample_id=rec.sample_id, row=rec.row,
                                        kinds=KINDS, top_k=k, **kw)


def _assert_same(got, want, atol=1e-5):
    assert got.sample_id == want.sample_id and got.row == want.row
    assert torch.equal(got.input_ids, want.input_ids.cpu())
    assert torch.equal(got.roles, want.roles.cpu())
    assert torch.equal(got.positions, want.positions.cpu())
    assert torch.equal(got.kinds, want.kinds.cpu())
    assert torch.equal(got.topk_ids, want.topk_ids.cpu())
    assert got.topk_ids.dtype == torch.int32 and got.topk_logprobs.dtype == torch.float32
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs.cpu(), atol=atol, rtol=0)
    torch.testing.assert_close(got.tail_logmass, want.tail_logmass.cpu(), atol=atol, rtol=0)
    assert got.visual_hidden is None


def test_logprob_objects_match_hf_records(hf_refs):
    """vLLM-shaped Logprob dicts -> the same ids, log-probs, tail, positions and kinds as
    ``teacher_records(..., top_k=K)`` on the same sample, every position kind included."""
    recs, refs, _ = hf_refs
    extra_entries = 0
    for rec, (logp, ids, roles) in zip(recs, refs):
        pl = vllm_shaped(logp, ids, K)
        assert pl[0] is None and len(pl) == len(ids)
        extra_entries += sum(len(e) == K + 1 for e in pl[1:])
        got = _convert(pl, ids, roles, rec)
        _assert_same(got, rec)
        assert {int(c) for c in got.kinds} == {0, 1, 2}  # prompt, visual and response positions all there
        # visual positions are those inside the expanded image span
        vis = np.nonzero(roles == ROLE_VISUAL)[0]
        assert set(vis[:-1]) <= set(got.positions.numpy()[got.kinds.numpy() == 1])
    assert extra_entries > 0, "the reference should contain k+1-entry positions (actual token outside top-k)"


def test_flat_and_json_forms(hf_refs):
    """Plain-float values (no rank) and JSON dicts with string keys convert to the same record."""
    recs, refs, _ = hf_refs
    rec, (logp, ids, roles) = recs[0], refs[0]
    base = _convert(vllm_shaped(logp, ids, K), ids, roles, rec)
    for form in ("flat", "json"):
        got = _convert(vllm_shaped(logp, ids, K, form), ids, roles, rec)
        _assert_same(got, base, atol=0)


def test_tail_is_exact_in_float64(hf_refs):
    """The tail from the head equals the float64 log-mass of the rest of the vocabulary."""
    recs, refs, _ = hf_refs
    rec, (logp, _, _) = recs[1], refs[1]
    pos = rec.positions.numpy()
    rows = logp[pos]  # [P, V]
    top = np.sort(rows, axis=1)[:, ::-1][:, :K]  # [P, K]
    rest = np.sort(rows, axis=1)[:, :-K]
    want = np.log(np.exp(rest).sum(1))
    np.testing.assert_allclose(tail_from_head(top), want, atol=1e-9, rtol=0)


def test_k_plus_one_entry_dropped_and_rank_order():
    """A dict in any order with the actual token at rank 37: kept are ranks 1..k, in rank order."""
    k = 3
    roles = np.array([0, 2, 2], dtype=np.uint8)
    ids = np.array([5, 9, 4])
    lp = {7: -0.5, 2: -1.5, 11: -2.0}
    entry = {9: Logprob(-6.0, 37, None), 11: Logprob(lp[11], 3, None), 7: Logprob(lp[7], 1, None),
             2: Logprob(lp[2], 2, None)}
    entry2 = {4: Logprob(-0.1, 1, None), 1: Logprob(-3.0, 2, None), 3: Logprob(-4.0, 3, None)}  # actual in top k
    rec = records_from_prompt_logprobs([None, entry, entry2], input_ids=ids, roles=roles, sample_id="s", row=0,
                                       kinds=("response",), top_k=k)
    assert rec.positions.tolist() == [0, 1]
    assert rec.topk_ids.tolist() == [[7, 2, 11], [4, 1, 3]]
    np.testing.assert_allclose(rec.topk_logprobs[0].numpy(), [-0.5, -1.5, -2.0], rtol=1e-7)
    want = math.log(1 - sum(math.exp(v) for v in lp.values()))
    assert rec.tail_logmass[0].item() == pytest.approx(want, rel=1e-6)


def test_head_holding_all_mass_caveat():
    """The precision caveat: the tail is clamped to [-inf, 0]; a head summing to >= 1 gives -inf;
    k = vocabulary size gives -inf exactly (as the HF backend)."""
    full = np.log(np.array([[0.5, 0.25, 0.25]]))
    assert tail_from_head(full)[0] == -np.inf or tail_from_head(full)[0] < -30
    over = np.array([[0.0, -40.0]])  # rounding: exp sums to > 1
    assert tail_from_head(over)[0] == -np.inf
    t = tail_from_head(np.log(np.array([[0.9, 0.05]])))
    assert t[0] == pytest.approx(math.log(0.05), rel=1e-12) and t[0] <= 0
    roles = np.array([0, 2], dtype=np.uint8)
    entry = {0: Logprob(math.log(0.5), 1), 1: Logprob(math.log(0.3), 2), 2: Logprob(math.log(0.2), 3)}
    rec = records_from_prompt_logprobs([None, entry], input_ids=np.array([0, 1]), roles=roles, sample_id="s",
                                       row=0, kinds=("response",), top_k=3, vocab_size=3)
    assert rec.tail_logmass.tolist() == [-math.inf]


def test_length_mismatch_names_the_sample(hf_refs):
    """vLLM's prompt with an unexpanded image placeholder (T - N_vis + 1 entries) is refused."""
    recs, refs, _ = hf_refs
    rec, (logp, ids, roles) = recs[0], refs[0]
    n_vis = int((roles == ROLE_VISUAL).sum())
    pl = vllm_shaped(logp, ids, K)[: len(ids) - n_vis + 1]
    with pytest.raises(ValueError, match=rf"sample '{rec.sample_id}'.*image placeholder"):
        _convert(pl, ids, roles, rec)


def test_too_few_entries_and_missing_entry():
    roles = np.array([0, 2], dtype=np.uint8)
    with pytest.raises(ValueError, match="need top-k = 3"):
        records_from_prompt_logprobs([None, {1: Logprob(-0.1, 1)}], input_ids=np.array([0, 1]), roles=roles,
                                     sample_id="x", row=4, kinds=("response",), top_k=3)
    with pytest.raises(ValueError, match="row 4.*only 1 of the entries have rank <= 2"):
        records_from_prompt_logprobs([None, {1: Logprob(-0.1, 1), 5: Logprob(-9.0, 40)}],
                                     input_ids=np.array([0, 5]), roles=roles, sample_id="x", row=4,
                                     kinds=("response",), top_k=2)
    with pytest.raises(ValueError, match="no log-probs there"):
        records_from_prompt_logprobs([None, None], input_ids=np.array([0, 1]), roles=roles, sample_id="x", row=4,
                                     kinds=("response",), top_k=1)


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed: the missing-dependency message cannot be tested")
def test_missing_vllm_says_how_to_install(tmp_path, synth_data, tiny_teacher):
    with pytest.raises(BackendUnavailable, match=r"pip install 'kdcache\[vllm\]'"):
        VllmTeacher(str(tiny_teacher), top_k=K)
    res = CliRunner().invoke(app, ["dump", "--backend", "vllm", "--teacher", str(tiny_teacher), "--data",
                                   str(synth_data["instruct_small"]), "--images", str(synth_data["images_root"]),
                                   "--out", str(tmp_path / "c.zarr")])
    assert res.exit_code == 2, res.output
    assert "kdcache[vllm]" in res.output
    assert not (tmp_path / "c.zarr" / "zarr.json").exists()


def test_dump_vllm_refuses_temperature_and_unknown_backend(tmp_path, synth_data, tiny_teacher):
    base = ["dump", "--backend", "vllm", "--teacher", str(tiny_teacher), "--data", str(synth_data["instruct_small"]),
            "--images", str(synth_data["images_root"]), "--out", str(tmp_path / "c.zarr")]
    res = CliRunner().invoke(app, base + ["--temperature", "2"])
    assert res.exit_code == 2 and "temperature 1" in res.output, res.output
    res = CliRunner().invoke(app, base + ["--targets", "sampled:16"])
    assert res.exit_code == 2 and "targets topk" in res.output, res.output
    res = CliRunner().invoke(app, base[:2] + ["tgi"] + base[3:])
    assert res.exit_code == 2 and "backend: 'tgi' is not one of hf, vllm" in res.output, res.output
    res = CliRunner().invoke(app, base + ["--vllm-gpu-memory-utilization", "1.5"])
    assert res.exit_code == 2 and "vllm.gpu_memory_utilization" in res.output, res.output
    assert not (tmp_path / "c.zarr").exists()


def _has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.vllm
@pytest.mark.skipif(not (HAVE_VLLM and _has_cuda()),
                    reason=f"needs vLLM and a GPU (vllm installed: {HAVE_VLLM}, CUDA: {torch.cuda.is_available()})")
def test_real_vllm_matches_hf(hf_refs, tiny_teacher, synth_data):
    """The real engine on the tiny teacher in float32: the same top-k ids at >= 99% of positions and
    log-probs within 1e-3 where they agree (kernels differ from the HF forward's)."""
    from kdcache.data.llava import load_image
    from kdcache.data.templates import tokenize_sample

    recs, _, V = hf_refs
    model_dir = str(tiny_teacher)
    from kdcache.config import VllmConfig

    teacher = VllmTeacher(model_dir, top_k=K, engine=VllmConfig(dtype="float32"), vocab_size=V)
    hf_model, processor = load_model(model_dir, device="cpu")
    conf = hf_model.config
    samples = read_llava_json(synth_data["instruct"])[:len(recs)]
    toks = [tokenize_sample(s, processor.tokenizer, template="chat", image_token_id=image_token_id(conf),
                            num_image_tokens=num_image_tokens(conf, processor), max_length=2048) for s in samples]
    items = [(t, load_image(Path(synth_data["images_root"]) / s.image, s)) for s, t in zip(samples, toks)]
    got = teacher.records(items, kinds=KINDS)
    same = total = 0
    for g, r in zip(got, recs):
        assert torch.equal(g.positions, r.positions.cpu())
        eq = (g.topk_ids == r.topk_ids.cpu()).all(1)
        same, total = same + int(eq.sum()), total + len(eq)
        torch.testing.assert_close(g.topk_logprobs[eq], r.topk_logprobs.cpu()[eq], atol=1e-3, rtol=0)
    assert same >= 0.99 * total


@pytest.mark.vllm
@pytest.mark.skipif(not (HAVE_VLLM and _has_cuda()),
                    reason=f"needs vLLM and a GPU (vllm installed: {HAVE_VLLM}, CUDA: {torch.cuda.is_available()})")
def test_real_vllm_hybrid_dump_verifies(tmp_path, tiny_teacher, synth_data):
    """``kdcache dump --backend vllm --hidden bf16`` with the real engine and the HF teacher on the
    same GPU: a cache that verifies, with hidden states for every visual token."""
    from kdcache.cache.reader import CacheReader
    from kdcache.cache.verify import verify_cache

    res = CliRunner().invoke(app, ["dump", "--backend", "vllm", "--hidden", "bf16", "--vllm-dtype", "float32",
                                   "--teacher", str(tiny_teacher), "--data", str(synth_data["instruct_small"]),
                                   "--images", str(synth_data["images_root"]), "--out", str(tmp_path / "c.zarr"),
                                   "--top-k", str(K), "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    rep = verify_cache(tmp_path / "c.zarr")
    assert rep.ok, str(rep)
    r = CacheReader(tmp_path / "c.zarr")
    assert r.attrs["settings"]["backend"] == "vllm" and r.attrs["settings"]["hidden"] == "bf16"
    assert r.num_samples > 0


class HfShapedEngine:
    """Stands in for vLLM's engine (not installed here): ``prompt_logprobs`` of vLLM's documented
    shape (``vllm_shaped``) from a plain HF forward of the same teacher, one sample at a time."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.requests = 0

    def prompt_logprobs(self, items):
        out = []
        for tok, image in items:
            pix = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits = self.model(input_ids=torch.from_numpy(tok.input_ids)[None], pixel_values=pix,
                                    use_cache=False).logits[0]  # [T, V]
            out.append(vllm_shaped(torch.log_softmax(logits.double(), -1).numpy(), tok.input_ids, K))
            self.requests += 1
        return out


def test_visual_hidden_states_equal_teacher_records(tiny_teacher, synth_data):
    """The prefix-only forward gives teacher_records' visual hidden states (float32, padded batch
    of samples of different lengths), and [0, D] without running anything for image-less rows."""
    from kdcache.positions import ROLE_PROMPT
    from kdcache.teacher import visual_hidden_states

    model, processor = load_model(str(tiny_teacher))
    model.eval()
    ds = llava_dataset(model, processor, synth_data["instruct"], synth_data["images_root"], 4)
    batch = collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # padding is exercised
    recs = teacher_records(model, batch, kinds=KINDS, top_k=K, with_hidden=True)
    got = visual_hidden_states(model, batch)
    last_vis = max(int(np.nonzero(r.roles.numpy() == ROLE_VISUAL)[0][-1]) for r in recs)
    assert last_vis + 1 < batch["input_ids"].shape[1]  # the prefix really is shorter than the batch
    for g, r in zip(got, recs):
        assert g.shape == r.visual_hidden.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, r.visual_hidden, atol=1e-5, rtol=1e-5)
    D = model.lm_head.weight.shape[1]
    text_only = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
                 "roles": torch.full((2, 5), ROLE_PROMPT, dtype=torch.uint8), "pixel_values": None}
    assert [tuple(h.shape) for h in visual_hidden_states(model, text_only)] == [(0, D), (0, D)]


def test_with_hidden_refuses_a_wrong_row_count(hf_refs):
    from kdcache.backends.vllm import with_hidden

    recs, refs, _ = hf_refs
    rec, (logp, ids, roles) = recs[0], refs[0]
    r = _convert(vllm_shaped(logp, ids, K), ids, roles, rec)
    n_vis = int((roles == ROLE_VISUAL).sum())
    assert with_hidden([r], [torch.zeros(n_vis, 4)])[0].visual_hidden.shape == (n_vis, 4)
    with pytest.raises(ValueError, match=rf"sample '{rec.sample_id}'.*\({n_vis - 1}, 4\) for {n_vis} visual"):
        with_hidden([r], [torch.zeros(n_vis - 1, 4)])


@pytest.mark.parametrize("hidden", ["none", "bf16"])
def test_vllm_dump_equals_hf_dump(hidden, tmp_path, synth_data, tiny_teacher):
    """The dump's vLLM path (``dump_with_vllm``: its HF copy for fingerprints, W^T W and, with
    ``hidden bf16``, the visual hidden states from the prefix forward; vLLM's log-probs from
    ``HfShapedEngine``) against an HF dump of the same samples: a verified cache with the same
    positions, top-k ids, log-probs and tails (float16 storage), the same hidden states bit for
    bit, the same Gram matrix, and settings that differ only in ``backend``."""
    import dataclasses

    from kdcache.cache.reader import CacheReader
    from kdcache.cache.verify import verify_cache
    from kdcache.config import DumpConfig, VllmConfig
    from kdcache.backends.vllm_dump import dump_with_vllm
    from kdcache.cache.store import cache_location
    from kdcache.dump import dump

    rows = json.loads(Path(synth_data["instruct"]).read_text())[:4]
    data = tmp_path / "four.json"
    data.write_text(json.dumps(rows))
    cfg = DumpConfig(teacher=str(tiny_teacher), data=str(data), images=str(synth_data["images_root"]),
                     out=str(tmp_path / "hf.zarr"), top_k=K, positions=KINDS, hidden=hidden, batch_size=2,
                     num_workers=0, device="cpu", commit_every_s=0.0)
    dump(cfg)
    vcfg = dataclasses.replace(cfg, out=str(tmp_path / "v.zarr"), backend="vllm", vllm=VllmConfig(dtype="float32", hf_batch_size=1))
    model, processor = load_model(str(tiny_teacher))
    engine = HfShapedEngine(model.eval(), processor)
    dump_with_vllm(vcfg, cache_location(vcfg.out), read_llava_json(data), 0.0, torch.device("cpu"), make_engine=lambda: engine)
    assert engine.requests == 4
    rep = verify_cache(tmp_path / "v.zarr")
    assert rep.ok, str(rep)
    hf, v = CacheReader(tmp_path / "hf.zarr"), CacheReader(tmp_path / "v.zarr")
    assert hf.attrs["settings"]["backend"] == "hf"
    assert v.attrs["settings"] == {**hf.attrs["settings"], "backend": "vllm"}
    assert v.attrs["teacher"] == hf.attrs["teacher"]  # same weights, same dtype (float32)
    np.testing.assert_array_equal(v.gram(), hf.gram())
    for row in range(4):
        a, b = hf.get_by_row(row), v.get_by_row(row)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.kinds, b.kinds) and torch.equal(a.topk_ids, b.topk_ids)
        # float16 storage: the two may round to neighbouring float16 values (one ulp = 2^-10 relative)
        torch.testing.assert_close(a.topk_logprobs.float(), b.topk_logprobs.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.tail_logmass, b.tail_logmass, atol=1e-4, rtol=0)
        if hidden == "none":
            assert a.visual_hidden is None and b.visual_hidden is None
        else:
            assert b.visual_hidden.dtype == torch.bfloat16
            assert b.visual_hidden.shape[0] == int((b.roles == ROLE_VISUAL).sum())
            # The prefix forward computes the same numbers in other shapes: float32 rounding (~1e-6 of
            # the row's scale, see test_visual_hidden_states_equal_teacher_records) flips the bf16
            # rounding of a rare element by one bf16 ulp (2^-8 relative), and an element near zero
            # keeps that float32 noise itself; everything else is bit-identical.
            x, y = a.visual_hidden.float(), b.visual_hidden.float()  # [N, D]
            same = (x == y).float().mean().item()
            assert same >= 0.999, same
            noise = 1e-5 * x.abs().amax(dim=1, keepdim=True)  # [N, 1] float32 noise of each row
            assert ((x - y).abs() <= x.abs() * 2.0 ** -7 + noise).all()
