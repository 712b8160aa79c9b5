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
        z = (hidden[s:s + chunk_size] @ lm_weight.T).float()  # [c, V]
        if lm_bias is not None:
            z = z + lm_bias.float()
        if temperature != 1.0:
            z = z / temperature
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


@torch.no_grad()
def teacher_records(model, batch: dict, *, kinds: tuple[str, ...], top_k: int, temperature: float = 1.0,
                    with_hidden: bool = True, chunk_size: int = 2048) -> list[TeacherRecord]:
    """Run the teacher on a collated batch (``kdcache.data.collate``) and return its records.

    batch: input_ids [B, T], attention_mask [B, T], roles [B, T] (255 = pad),
    pixel_values [n_img, 3, H, W] or None, sample_ids, rows. Records stay on the model's device.
    """
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
    lm = model.lm_head
    ids, lps, tail = topk_from_hidden(h, lm.weight, top_k, temperature=temperature,
                                      chunk_size=chunk_size, lm_bias=lm.bias)

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
        ))
        off += P
    if was_training:
        model.train()
    return records
