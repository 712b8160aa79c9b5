"""Helpers for the cache tests: consistent random teacher records and cache attributes."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.cache import Layout, make_attrs
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL, select_positions
from kdcache.records import TeacherRecord

VOCAB = 97
HIDDEN = 16
K = 8
# tiny chunks/shards so a few dozen samples span many chunks and shards
SMALL = Layout(chunk_bytes=512, shard_bytes=2048, index_chunk_rows=8)


def make_attrs_for(*, k=K, vocab=VOCAB, hidden_size=HIDDEN, hidden="bf16", world_size=1,
                   positions=("visual", "response"), logprob_dtype="float16", layout=SMALL):
    teacher = {"name_or_path": "tiny-teacher", "config_hash": "c0ffee", "vocab_size": vocab,
               "hidden_size": hidden_size, "dtype": "bfloat16", "num_image_tokens": 6}
    tokenizer = {"name_or_path": "tiny-tok", "vocab_hash": "abc", "template": "qwen2",
                 "template_hash": "def"}
    dataset = {"path": "data.json", "num_rows": 1000, "sha256": "0" * 64}
    settings = {"top_k": k, "positions": list(positions), "logprob_dtype": logprob_dtype,
                "hidden": hidden, "temperature": 1.0, "relation": "hidden", "max_length": 256,
                "world_size": world_size, "targets": "topk"}
    return make_attrs(teacher, tokenizer, dataset, settings, layout=layout)


def make_roles(rng: np.random.Generator, n_vis: int) -> np.ndarray:
    """[prompt, visual, prompt, response, (prompt, response)] with random lengths."""
    segs = [(ROLE_PROMPT, rng.integers(2, 6)), (ROLE_VISUAL, n_vis),
            (ROLE_PROMPT, rng.integers(1, 4)), (ROLE_RESPONSE, rng.integers(2, 9))]
    if rng.random() < 0.5:
        segs += [(ROLE_PROMPT, rng.integers(1, 4)), (ROLE_RESPONSE, rng.integers(1, 6))]
    return np.concatenate([np.full(int(n), r, dtype=np.uint8) for r, n in segs])


def make_record(row: int, *, seed: int = 0, k=K, vocab=VOCAB, hidden_size=HIDDEN, hidden="bf16",
                positions=("visual", "response"), n_vis=6, sample_id=None) -> TeacherRecord:
    """A consistent record: true top-k log-probs and tail of random logits (float64)."""
    rng = np.random.default_rng([seed, row])
    roles = make_roles(rng, n_vis)
    T = roles.shape[0]
    ids = rng.integers(0, vocab, size=T).astype(np.int32)
    pos, kinds = select_positions(roles, tuple(positions))
    logits = torch.from_numpy(rng.normal(0, 3, size=(len(pos), vocab)))  # [P, V] float64
    logp = torch.log_softmax(logits, dim=-1)
    top_lp, top_id = logp.topk(k, dim=-1)  # sorted descending
    rest = logp.scatter(-1, top_id, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)  # log-mass outside the top-k
    vis = None
    if hidden != "none":
        vis = torch.from_numpy(rng.normal(size=(int((roles == ROLE_VISUAL).sum()), hidden_size)))
        vis = vis.to(torch.bfloat16 if hidden == "bf16" else torch.float32)
    return TeacherRecord(
        sample_id=sample_id or f"s{row:05d}",
        row=row,
        input_ids=torch.from_numpy(ids),
        roles=torch.from_numpy(roles),
        positions=torch.from_numpy(pos),
        kinds=torch.from_numpy(kinds),
        topk_ids=top_id.to(torch.int32),
        topk_logprobs=top_lp.to(torch.float16),
        tail_logmass=tail.to(torch.float32),
        visual_hidden=vis,
    )


def records_equal(a: TeacherRecord, b: TeacherRecord) -> None:
    """Assert exact equality (bf16 compared bit for bit)."""
    assert a.sample_id == b.sample_id and a.row == b.row
    for name in ("input_ids", "roles", "positions", "kinds", "topk_ids", "topk_logprobs",
                 "tail_logmass"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name
    if a.visual_hidden is None:
        assert b.visual_hidden is None
    else:
        assert a.visual_hidden.dtype == b.visual_hidden.dtype
        assert a.visual_hidden.shape == b.visual_hidden.shape
        bits = [h.view(torch.int16) if h.dtype == torch.bfloat16 else h
                for h in (a.visual_hidden, b.visual_hidden)]
        assert torch.equal(*bits)


def write_cache(path, records, *, attrs=None, rank=0, world_size=1, layout=SMALL, skips=(),
                close=True):
    """Write ``records`` (and ``skips`` = [(row, sid, reason)]) to a cache; returns the writer."""
    from kdcache.cache import CacheWriter

    attrs = attrs or make_attrs_for(world_size=world_size, layout=layout)
    w = CacheWriter(path, attrs, rank=rank, world_size=world_size, layout=layout)
    for r in records:
        w.add(r)
    for row, sid, reason in skips:
        w.skip(row, sid, reason)
    if close:
        w.close()
    return w
