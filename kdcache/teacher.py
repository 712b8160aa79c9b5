"""Teacher targets: one teacher-forced pass over a batch -> one ``TeacherRecord`` per sample.

The dump writes these records to the cache; the trainer's online mode (``--teacher``) feeds
the same records straight to the losses, which makes this function the reference for every
exactness test (design section 2).

Per sample, at the chosen position kinds (``kdcache.positions``):
  top-k ids and TRUE log-probs   log p_i = z_i/T - logsumexp(z/T)       over the full vocabulary
  tail log-mass                  log(1 - sum_topk p) = logsumexp(z_rest/T) - logsumexp(z/T)
and, inside the image span, the final-normed hidden states H (the LM head's input), so that
logits are Z = H W^T and the relation target R = Z Z^T = H (W^T W) H^T.

The LM head runs over chunks of positions: a batch's full [B, T, V] logits never exist.

Target modes (``targets=``, ``kdcache.target_kinds.parse_targets``): ``topk`` as above; ``hidden``
adds H at every distilled position (exact KD from H and the LM head); ``sampled:N`` replaces the
top-k by N draws per position from softmax(z/T) (``sample_from_hidden``), seeded per sample by
(draw_seed, row) (``sample_uniforms``) so a sample's draws do not depend on its batch.

H is ``LlavaModel``'s ``last_hidden_state``, i.e. after the LLM's final RMSNorm. In transformers 5
this is also what ``LlavaForConditionalGeneration(..., output_hidden_states=True).hidden_states[-1]``
returns (the output capture overwrites the last entry with the normed state), which
``tests/test_teacher.py`` checks with a hook on the norm. Logits are computed in the model's dtype
(bf16 on GPU, like ``model(...).logits``) and soft-maxed in float32.
"""

from __future__ import annotations

import torch

from .positions import select_positions, visual_span
from .records import TeacherRecord
from .target_kinds import parse_targets


def _chunk_logits(h: torch.Tensor, lm_weight: torch.Tensor, lm_bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """z / T for a chunk of rows: h [c, D] @ W^T in the weights' dtype (bf16 on GPU, like
    ``model(...).logits``), then float32 -> [c, V]."""
    z = (h @ lm_weight.T).float()
    if lm_bias is not None:
        z = z + lm_bias.float()
    return z if temperature == 1.0 else z / temperature


@torch.no_grad()
def topk_from_hidden(hidden: torch.Tensor, lm_weight: torch.Tensor, k: int, *, temperature: float = 1.0,
                     chunk_size: int = 2048, lm_bias: torch.Tensor | None = None):
    """Top-k log-probs and tail log-mass of ``softmax(h W^T / T)``, a chunk of rows at a time.

    hidden [P, D], lm_weight [V, D] -> ids int64 [P, k], logprobs float32 [P, k] (descending),
    tail float32 [P] (-inf when k = V).
    """
    P = hidden.shape[0]
    V = lm_weight.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"top-k must be in [1, vocabulary size {V}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = torch.empty(P, k, dtype=torch.int64, device=hidden.device)
    lps = torch.empty(P, k, dtype=torch.float32, device=hidden.device)
    tail = torch.empty(P, dtype=torch.float32, device=hidden.device)
    for s in range(0, P, chunk_size):
        z = _chunk_logits(hidden[s:s + chunk_size], lm_weight, lm_bias, temperature)  # [c, V] float32
        lse = torch.logsumexp(z, dim=-1)  # [c]
        top, idx = torch.topk(z, k, dim=-1, sorted=True)  # [c, k]
        ids[s:s + chunk_size] = idx
        lps[s:s + chunk_size] = top - lse[:, None]
        if k == V:
            tail[s:s + chunk_size] = float("-inf")
        else:
            # logsumexp of the logits outside the top-k, never log(1 - sum p): that loses all
            # precision when the head holds nearly all the mass.
            z.scatter_(1, idx, float("-inf"))
            tail[s:s + chunk_size] = torch.logsumexp(z, dim=-1) - lse
    return ids, lps, tail


def sample_uniforms(draw_seed: int, row: int, num_positions: int, n: int) -> torch.Tensor:
    """The uniforms of the draws of the sample with dataset row ``row``: float64 [P, n] on the CPU.

    A CPU ``torch.Generator`` seeded from (draw_seed, row) through numpy's SeedSequence (a hash,
    so nearby rows or seeds give unrelated streams): the draws of a sample depend on nothing else,
    whatever the batch it falls in, the rank that dumps it, or the device.
    """
    import numpy as np

    if draw_seed < 0 or row < 0:
        raise ValueError(f"draw_seed ({draw_seed}) and row ({row}) must be >= 0")
    seed = int(np.random.SeedSequence([int(draw_seed), int(row)]).generate_state(1, np.uint64)[0])
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(num_positions, n, dtype=torch.float64, generator=g)


@torch.no_grad()
def sample_from_hidden(hidden: torch.Tensor, lm_weight: torch.Tensor, n: int, *, uniforms: torch.Tensor,
                       temperature: float = 1.0, chunk_size: int = 2048, lm_bias: torch.Tensor | None = None):
    """N draws with replacement from ``p = softmax(h W^T / T)`` per row (Anshumann et al. 2025).

    hidden [P, D], lm_weight [V, D], uniforms float64 [P, n] in [0, 1) ->
      ids      int64   [P, n]  the distinct drawn ids, sorted by log-prob descending (ties: id
                               ascending); padding columns (fewer than n distinct ids) at the end: 0
      logprobs float32 [P, n]  TRUE log-probs log p_i = z_i/T - logsumexp(z/T); -inf on padding
      tail     float32 [P]     log of the mass outside the distinct ids: logsumexp(z_rest/T) -
                               logsumexp(z/T) (-inf when every id was drawn)
      counts   int64   [P, n]  draws per id, summing to n per row; 0 on padding

    Inverse CDF: draw j of row r is the smallest id i with cdf_r[i] > u[r, j] * cdf_r[V-1], where
    cdf is the float64 cumulative sum of the row's probabilities (scaling by the last entry
    absorbs its rounding). A zero-probability id repeats its predecessor's cdf value, so it is
    never the smallest such id; the one case that can reach past the last bin (u * total rounding
    up to total) is sent to the last id of positive probability. Logits are computed in the
    weights' dtype and soft-maxed in float32, like ``topk_from_hidden``; one chunk holds
    [chunk_size, V] logits in float32 plus their float64 cdf.
    """
    P = hidden.shape[0]
    V = lm_weight.shape[0]
    if n < 1:
        raise ValueError(f"the number of draws must be >= 1, got {n}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tuple(uniforms.shape) != (P, n):
        raise ValueError(f"uniforms must be [P={P}, n={n}], got {tuple(uniforms.shape)}")
    dev = hidden.device
    ids = torch.zeros(P, n, dtype=torch.int64, device=dev)
    lps = torch.full((P, n), float("-inf"), dtype=torch.float32, device=dev)
    tail = torch.empty(P, dtype=torch.float32, device=dev)
    counts = torch.zeros(P, n, dtype=torch.int64, device=dev)
    for s in range(0, P, chunk_size):
        z = _chunk_logits(hidden[s:s + chunk_size], lm_weight, lm_bias, temperature)  # [c, V] float32
        c = z.shape[0]
        lse = torch.logsumexp(z, dim=-1)  # [c]
        logp = z - lse[:, None]  # [c, V] float32
        cdf = torch.cumsum(logp.double().exp(), dim=-1)  # [c, V] float64
        u = uniforms[s:s + chunk_size].to(device=dev, dtype=torch.float64) * cdf[:, -1:]  # [c, n]
        draw = torch.searchsorted(cdf, u, right=True)  # [c, n] in [0, V]
        over = draw >= V
        if over.any():
            positive = logp > float("-inf")  # [c, V]
            last = V - 1 - torch.flip(positive, dims=[1]).int().argmax(dim=1)  # [c]
            draw = torch.where(over, last[:, None].expand_as(draw), draw)
        # distinct ids and their counts without a [c, V] histogram: sort the draws, mark first
        # occurrences, number the groups
        srt, _ = torch.sort(draw, dim=1)  # [c, n]
        first = torch.ones_like(srt, dtype=torch.bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        group = torch.cumsum(first.long(), dim=1) - 1  # [c, n] group of each draw
        cnt = torch.zeros(c, n, dtype=torch.int64, device=dev).scatter_add_(1, group, torch.ones_like(group))
        uniq = torch.zeros(c, n, dtype=torch.int64, device=dev).scatter_(1, group, srt)  # [c, n]
        valid = cnt > 0  # [c, n] the first (number of distinct ids) columns
        lp = logp.gather(1, uniq).masked_fill(~valid, float("-inf"))  # [c, n]
        # descending log-prob; stable, so equal log-probs keep id order and padding stays last
        lp, order = torch.sort(lp, dim=1, descending=True, stable=True)
        uniq = torch.where(valid.gather(1, order), uniq.gather(1, order), 0)
        cnt = cnt.gather(1, order)
        ids[s:s + chunk_size] = uniq
        lps[s:s + chunk_size] = lp
        counts[s:s + chunk_size] = cnt
        # padding columns point at column 0 (always a drawn id) so they mask nothing extra
        mask_ids = torch.where(cnt > 0, uniq, uniq[:, :1])
        z.scatter_(1, mask_ids, float("-inf"))
        tail[s:s + chunk_size] = torch.logsumexp(z, dim=-1) - lse
    return ids, lps, tail, counts


@torch.no_grad()
def teacher_records(model, batch: dict, *, kinds: tuple[str, ...], top_k: int, temperature: float = 1.0,
                    with_hidden: bool = True, chunk_size: int = 2048, targets: str = "topk",
                    draw_seed: int = 0, relation: str = "hidden", relation_sqrt: torch.Tensor | None = None,
                    relation_dtype: torch.dtype = torch.bfloat16) -> list[TeacherRecord]:
    """Run the teacher on a collated batch (``kdcache.data.collate``) and return its records.

    batch: input_ids [B, T], attention_mask [B, T], roles [B, T] (255 = pad),
    pixel_values [n_img, 3, H, W] or None, sample_ids, rows. Records stay on the model's device.

    targets (``kdcache.target_kinds.parse_targets``):
      ``topk``       top-k ids / log-probs / tail (``topk_from_hidden``)
      ``hidden``     the same top-k, plus ``position_hidden`` [P, D]: the LM head's input at every
                     distilled position, rows in ``positions`` order (refused for an LM head with
                     a bias: logits would no longer be H W^T)
      ``sampled:N``  ``top_k`` is not used: N draws per position (``sample_from_hidden``) with the
                     uniforms of ``sample_uniforms(draw_seed, row, P, N)``; ids / log-probs / tail
                     as it returns them and ``sample_counts`` int32 [P, N]
    ``visual_hidden`` (``with_hidden``) is filled in every mode.

    relation (``kdcache.relation.parse_relation``): ``hidden`` (default) or ``none`` leave the
    records as above; ``lowrank:R`` (needs ``with_hidden``) replaces ``visual_hidden`` by
    ``visual_factor`` [N_vis, R] in ``relation_dtype`` with F F^T ~ H M H^T, and its
    ``relation_error`` (``kdcache.relation.factor_records``). ``relation_sqrt``: C [D, D] =
    ``gram_sqrt(W^T W)``, computed from the LM head when None (an eigh of D x D: pass it to a
    loop over batches, as the dump does).
    """
    from .relation import factor_records, gram_sqrt, lm_gram, parse_relation

    kind = parse_targets(targets)
    rel = parse_relation(relation)
    if rel.factored and not with_hidden:
        raise ValueError(f"relation {relation!r} factors the visual hidden states: it needs with_hidden=True")
    lm = model.lm_head
    if kind.exact and lm.bias is not None:
        raise ValueError("targets 'hidden' needs logits = H W^T, but the teacher's lm_head has a bias "
                         f"(lm_head.bias {tuple(lm.bias.shape)}): use --targets topk or sampled:N")
    was_training = model.training
    model.eval()
    device = model.device
    input_ids = batch["input_ids"].to(device)
    attn = batch["attention_mask"].to(device)
    pixels = batch.get("pixel_values")
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=model.dtype)
    out = model.model(input_ids=input_ids, attention_mask=attn, pixel_values=pixels, use_cache=False)
    hidden = out.last_hidden_state  # [B, T, D], final-normed: the LM head's input

    roles_all = batch["roles"].cpu().numpy()
    lengths = batch["attention_mask"].sum(1).tolist()
    sel, spans, per_sample = [], [], []
    for b, n in enumerate(lengths):
        roles = roles_all[b, :n]
        pos, kc = select_positions(roles, kinds)
        sel.append(hidden[b, torch.from_numpy(pos).to(device).long()])
        spans.append(torch.from_numpy(visual_span(roles)).to(device).long())
        per_sample.append((roles, pos, kc))
    h = torch.cat(sel)  # [P_total, D]
    rows = [int(batch["rows"][b]) for b in range(len(per_sample))]

    def uniforms(n: int) -> torch.Tensor:  # [P_total, n] float64 on the CPU, one stream per sample
        # per-sample streams: a sample's draws do not depend on the batch it falls in
        return torch.cat([sample_uniforms(draw_seed, rows[b], len(pos), n) for b, (_r, pos, _k) in enumerate(per_sample)])

    ids, lps, tail, counts = kind.position_targets(h, lm, top_k=top_k, temperature=temperature,
                                                   chunk_size=chunk_size, uniforms=uniforms)

    records, off = [], 0
    for b, (roles, pos, kc) in enumerate(per_sample):
        n, P = lengths[b], len(pos)
        records.append(TeacherRecord(
            sample_id=str(batch["sample_ids"][b]), row=int(batch["rows"][b]),
            input_ids=batch["input_ids"][b, :n].to(torch.int32),
            roles=torch.from_numpy(roles.astype("uint8")),
            positions=torch.from_numpy(pos), kinds=torch.from_numpy(kc),
            topk_ids=ids[off:off + P].to(torch.int32), topk_logprobs=lps[off:off + P],
            tail_logmass=tail[off:off + P],
            visual_hidden=hidden[b, spans[b]] if with_hidden else None,
            sample_counts=counts[off:off + P] if counts is not None else None,
            position_hidden=h[off:off + P] if kind.exact else None,
        ))
        off += P
    if was_training:
        model.train()
    if rel.factored:
        if relation_sqrt is None:
            relation_sqrt = gram_sqrt(lm_gram(lm.weight.detach().float()))  # [D, D]
        records = factor_records(records, relation_sqrt, rel.rank, relation_dtype)
    return records


@torch.no_grad()
def visual_hidden_states(model, batch: dict) -> list[torch.Tensor]:
    """Final-normed hidden states at the visual positions, per sample: ``teacher_records``'s
    ``visual_hidden`` without the log-probs (the vLLM backend's hybrid mode takes its log-probs
    from vLLM and these from the HF teacher).

    batch: a collated batch (``kdcache.data.collate``): input_ids / attention_mask / roles [B, T]
    right-padded, pixel_values [n_img, 3, H, W] or None. -> B tensors [N_vis_b, D] on the model's
    device, in the model's dtype ([0, D] for a sample without an image).

    Only the prefix up to the end of the batch's last image span is run: the LLM is causal, so the
    state at t depends on tokens <= t alone, and the text after the image (the prompt's question,
    the whole answer) need not be computed. With the image near the start of a sample, as in
    LLaVA data, this is the vision tower plus ~N_vis LLM tokens per sample instead of all T.
    """
    device = model.device
    roles = batch["roles"].cpu().numpy()  # [B, T], ROLE_PAD on padding
    spans = [visual_span(r) for r in roles]
    D = model.lm_head.weight.shape[1]
    end = max((int(s[-1]) + 1 for s in spans if len(s)), default=0)
    if end == 0:  # no image in the batch: nothing to run
        return [torch.empty(0, D, dtype=model.dtype, device=device) for _ in spans]
    was_training = model.training
    model.eval()
    pixels = batch.get("pixel_values")
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=model.dtype)
    # Every image span lies inside [0, end): the cut keeps each image's tokens whole, which the
    # model's image-token count check needs.
    out = model.model(input_ids=batch["input_ids"][:, :end].to(device),
                      attention_mask=batch["attention_mask"][:, :end].to(device),
                      pixel_values=pixels, use_cache=False)
    hidden = out.last_hidden_state  # [B, end, D], final-normed: the LM head's input
    if was_training:
        model.train()
    return [hidden[b, torch.from_numpy(s).to(device).long()] for b, s in enumerate(spans)]
