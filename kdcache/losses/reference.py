"""The plain, exact losses over materialised logits: the reference every fused path is tested against.

Shapes: N = positions, V = vocabulary, k = cached top-k ids. Each function returns per-position
values (no reduction) except ``cross_entropy``; average them with ``masked_mean`` over the
positions of each term (design section 1).

    L_reg        cross-entropy on response positions                     (``cross_entropy``)
    L_res, L_vis D(teacher || student) at response / visual positions     (``topk_divergence``;
                 exact targets ``full_divergence``; sampled targets ``sampled_kl``)

Top-k + tail buckets (design section 2). The teacher's distribution at a position is known
through k ids with their true log-probs and the log-mass of "the rest",
``tail = log(1 - sum_j p_j)``. Both distributions are coarsened to the same k+1 buckets

    t = [p_t(id_1), ..., p_t(id_k), p_t(rest)]     s = [p_s(id_1), ..., p_s(id_k), p_s(rest)]

and the divergence is taken between t and s. Coarsening is a Markov map, so by the
data-processing inequality every divergence here is <= its full-vocabulary value, with
equality at k = V (the rest is empty and its bucket contributes exactly 0).

Exact (``targets: hidden``). The cache holds the teacher's final-normed hidden states h_t
[N, D_t] at every distilled position and its LM head W_t [V, D_t] once, so the full teacher
distribution is ``log_softmax(h_t W_t^T / T)``: no coarsening, no bias, and T applies exactly
to both sides. ``full_divergence`` is the plain reference over [N, V] logits.

Sampled (``targets: sampled:n``; Anshumann et al. 2025, "Sparse logit sampling: accelerating
knowledge distillation in LLMs", who show that top-k targets bias the student). At each
position the dump draws n ids with replacement from the teacher distribution p (at the dump
temperature) and stores the distinct ids j with their counts c_j (sum_j c_j = n) and true
log-probs lp_j = log p_j. The estimator of forward KL(p || s), s = softmax(z / T), is

    KL_hat = sum_j (c_j / n) (lp_j - log s_j)                              (``sampled_kl``)

Its expectation is exact: c_j ~ Binomial(n, p_j), so E[c_j / n] = p_j and, summing over the
whole vocabulary (ids never drawn have c_j = 0), E[KL_hat] = sum_v p_v (log p_v - log s_v) =
KL(p || s). KL_hat is linear in the counts and lp, log s do not depend on the draw, so the
gradient is unbiased too: E[d KL_hat / dz] = (s - p) / T = dKL/dz. Only forward KL is an
expectation under p of a function of single ids; reverse KL, JSD, skew KL and TVD are not, and
are refused. Note the teacher side is p itself: T tempers the student only (the draws cannot
be re-tempered without bias), so distil at the dump temperature to compare like with like.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .divergences import resolve_divergence

IGNORE_INDEX = -100
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Small helpers


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (tight tests), else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``: sum(values[mask]) / count -> scalar.

    values: [...] float; mask: [...] bool (same shape). With no valid position the result is
    0 and still part of the graph (its gradient is zero), so the caller can always add it to
    the total. Masked-out values never reach the result, not even as NaN or inf, nor their
    gradients.
    """
    if values.shape != mask.shape:
        raise ValueError(f"masked_mean: values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.bool()
    total = torch.where(mask, values, values.new_zeros(())).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-position CE: logits [..., V] (any float dtype, computed in float32), labels [...] of the
    *next* token (already shifted) or ``ignore_index`` -> [...] float, 0 where ignored."""
    V = logits.shape[-1]
    cdt = compute_dtype(logits)
    ce = F.cross_entropy(logits.reshape(-1, V).to(cdt), labels.reshape(-1).long(), ignore_index=ignore_index,
                         reduction="none")
    return ce.reshape(labels.shape)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """L_reg: mean CE over positions whose label != ``ignore_index`` -> scalar (0 if none).

    logits [..., V], labels [...] already shifted (label at t = token t+1).
    """
    return masked_mean(token_cross_entropy(logits, labels, ignore_index), labels != ignore_index)


# ---------------------------------------------------------------------------------------------
# Divergences between bucket distributions


def _kl_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p - log q), with 0 log 0 = 0 and finite gradients there.

    The double substitution keeps NaN out of the backward pass too: where p = 0 the product
    is evaluated on safe zeros and then masked, so no 0 * inf ever meets a gradient.
    """
    zero = torch.isneginf(lp)
    lp0 = lp.masked_fill(zero, 0.0)
    lq0 = lq.masked_fill(zero, 0.0)
    return (lp0.exp() * (lp0 - lq0)).masked_fill(zero, 0.0)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w exp(la) + (1 - w) exp(lb)) for w in [0, 1]."""
    if w == 0.0:
        return lb
    if w == 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def bucket_divergence(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, divergence: str = "fkl", **params
) -> torch.Tensor:
    """D(t, s) between two distributions given by log-probs over the last axis -> [...].

    teacher_logprobs, student_logprobs: [..., B] normalised log-probs (B buckets; -inf allowed
    for an empty bucket). A bucket that is -inf on both sides contributes exactly 0, with
    finite gradients, for every divergence.

    fkl   KL(t || s)         = sum t (log t - log s)
    rkl   KL(s || t)         = sum s (log s - log t)
    jsd   TRL's ``GKDTrainer.generalized_jsd_loss`` convention (GKD, Agarwal et al. 2024, eq. 1):
          m = beta t + (1 - beta) s,  JSD = beta KL(t || m) + (1 - beta) KL(s || m) for
          0 < beta < 1; beta = 0 is *defined* as forward KL and beta = 1 as reverse KL (as
          TRL does; the formula itself goes to 0 at both ends). beta = 0.5 is the ordinary JSD.
    skl   KL(t || alpha t + (1 - alpha) s)   (DistiLLM skew KL; alpha = 0 is forward KL)
    srkl  KL(s || alpha s + (1 - alpha) t)   (DistiLLM skew reverse KL)
    tvd   0.5 sum |t - s|
    """
    p = resolve_divergence(divergence, params)
    lt, ls = teacher_logprobs, student_logprobs
    if lt.shape != ls.shape:
        raise ValueError(f"bucket_divergence: teacher {tuple(lt.shape)} and student {tuple(ls.shape)} differ")
    empty = torch.isneginf(lt) & torch.isneginf(ls)
    lt = lt.masked_fill(empty, 0.0)  # safe values; the bucket is masked out below
    ls = ls.masked_fill(empty, 0.0)
    if divergence == "jsd" and p["beta"] in (0.0, 1.0):
        divergence = "fkl" if p["beta"] == 0.0 else "rkl"
    if divergence == "fkl":
        terms = _kl_terms(lt, ls)
    elif divergence == "rkl":
        terms = _kl_terms(ls, lt)
    elif divergence == "jsd":
        beta = p["beta"]
        lm = _log_mix(lt, ls, beta)
        terms = beta * _kl_terms(lt, lm) + (1.0 - beta) * _kl_terms(ls, lm)
    elif divergence == "skl":
        terms = _kl_terms(lt, _log_mix(lt, ls, p["alpha"]))
    elif divergence == "srkl":
        terms = _kl_terms(ls, _log_mix(ls, lt, p["alpha"]))
    else:  # tvd
        terms = 0.5 * (lt.exp() - ls.exp()).abs()
    return terms.masked_fill(empty, 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------
# Top-k (+ tail) buckets


def teacher_bucket_logprobs(
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor | None,
    vocab_size: int,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
    topk_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher's bucket log-probs: [N, k] (+ [N] tail) -> [N, k+1], or [N, k] without a tail.

    With a tail: ``log_softmax(cat(topk_logprobs, tail_logmass) / T)``. At T = 1 this only
    renormalises (the cached float16 log-probs sum to 1 within rounding, so it is the
    identity up to that rounding and makes t an exact distribution). At T != 1 it is exact for
    the k ids relative to each other but treats the tail as a single atom: the true tempered
    tail would be sum_rest p_v^(1/T), whose inner shape the cache does not know. Without a
    tail (renormalised top-k): ``log_softmax(topk_logprobs / T)`` over the k ids, exact.

    At k = V the rest is empty: the tail is set to -inf whatever was passed (a finite value
    there can only be rounding), so that bucket contributes nothing. ``topk_mask`` [N, k] bool
    (variable-k targets, e.g. nucleus): False columns are padding, an empty bucket (-inf); the
    rest is empty on the rows whose valid columns number V.
    """
    lp = topk_logprobs.to(dtype)
    if topk_mask is not None:
        lp = lp.masked_fill(~topk_mask, NEG_INF)
    if tail_logmass is None:
        return torch.log_softmax(lp / temperature, dim=-1)
    tail = tail_logmass.to(dtype)
    if topk_mask is not None:
        tail = torch.where(topk_mask.sum(-1) >= vocab_size, NEG_INF, tail)
    elif lp.shape[-1] >= vocab_size:
        tail = torch.full_like(tail, NEG_INF)
    return torch.log_softmax(torch.cat([lp, tail.unsqueeze(-1)], dim=-1) / temperature, dim=-1)


def student_buckets_from_parts(u_k: torch.Tensor, lse_all: torch.Tensor, lse_tail: torch.Tensor) -> torch.Tensor:
    """Student bucket log-probs from u = logits / T: u_k [N, k] (gathered at the ids),
    lse_all [N] = logsumexp(u), lse_tail [N] = logsumexp(u over the ids' complement)
    -> [N, k+1] = [u_k - lse_all, lse_tail - lse_all]."""
    return torch.cat([u_k - lse_all.unsqueeze(-1), (lse_tail - lse_all).unsqueeze(-1)], dim=-1)


def _tail_logsumexp(u: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logsumexp of u [N, V] outside ids [N, k] -> [N]; -inf (no gradient) when k = V.

    Masking the k ids to -inf keeps full precision when the head holds almost all the mass,
    where log(1 - sum p) would round to log(0).
    """
    if ids.shape[-1] >= u.shape[-1]:
        # An all -inf logsumexp has a NaN gradient; the empty rest needs no gradient anyway.
        return u.new_full(u.shape[:-1], NEG_INF)
    return torch.logsumexp(u.scatter(-1, ids, NEG_INF), dim=-1)


def pad_ids_to_first(topk_ids: torch.Tensor, topk_mask: torch.Tensor) -> torch.Tensor:
    """Padding columns (``topk_mask`` False) take the row's first id, so every id a row holds is
    one of its valid ids: scattering at the ids then touches exactly the valid set. -> long [N, k]."""
    ids = topk_ids.long()
    return torch.where(topk_mask, ids, ids[:, :1])


def student_bucket_logprobs(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, with_tail: bool = True, temperature: float = 1.0,
    topk_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Student's full distribution coarsened to the teacher's buckets.

    student_logits [N, V] (computed in float32, or float64 if given), topk_ids int [N, k]
    (distinct per row) -> [N, k+1] with_tail (log_softmax(z/T) at the ids, then the rest),
    else [N, k] = log_softmax over the k ids' logits only (renormalised top-k).
    topk_mask [N, k] bool: False columns are padding (an empty bucket; their ids are ignored),
    the rest is everything outside the valid ids.
    """
    u = student_logits.to(compute_dtype(student_logits)) / temperature  # [N, V]
    if topk_mask is None:
        ids = topk_ids.long()
        u_k = u.gather(-1, ids)  # [N, k]
        if not with_tail:
            return torch.log_softmax(u_k, dim=-1)
        return student_buckets_from_parts(u_k, torch.logsumexp(u, dim=-1), _tail_logsumexp(u, ids))
    ids = pad_ids_to_first(topk_ids, topk_mask)
    u_k = u.gather(-1, ids).masked_fill(~topk_mask, NEG_INF)  # [N, k]
    if not with_tail:
        return torch.log_softmax(u_k, dim=-1)
    full = (topk_mask.sum(-1) >= u.shape[-1]).unsqueeze(-1)  # [N, 1] an empty rest: -inf, no gradient
    rest = u.scatter(-1, ids, NEG_INF).masked_fill(full, 0.0)  # [N, V]
    lse_tail = torch.logsumexp(rest, dim=-1).masked_fill(full.squeeze(-1), NEG_INF)
    return student_buckets_from_parts(u_k, torch.logsumexp(u, dim=-1), lse_tail)


def _check_topk(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature, topk_mask=None) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    N, V = student_logits.shape
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != N:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must both be "
            f"[N, k] with N = {N} (the student's positions)"
        )
    if topk_ids.shape[1] > V:
        raise ValueError(f"k = {topk_ids.shape[1]} exceeds the student's vocabulary V = {V}")
    if tail_logmass is not None and tuple(tail_logmass.shape) != (N,):
        raise ValueError(f"tail_logmass must be [N] = [{N}], got {tuple(tail_logmass.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk_mask is not None:
        check_topk_mask(topk_mask, topk_ids.shape)


def check_topk_mask(topk_mask: torch.Tensor, shape) -> None:
    """topk_mask: bool of the ids' shape [N, k], the valid columns first (column 0 always valid)."""
    if topk_mask.dtype != torch.bool or tuple(topk_mask.shape) != tuple(shape):
        raise ValueError(f"topk_mask must be bool {list(shape)} like topk_ids, got {topk_mask.dtype} "
                         f"{list(topk_mask.shape)}")
    if topk_mask.numel() and not bool(topk_mask[:, 0].all()):
        raise ValueError("topk_mask: every row needs its first column valid (the valid ids come first)")


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    topk_mask: torch.Tensor | None = None,
    **params,
) -> torch.Tensor:
    """Per-position divergence between the teacher's top-k(+tail) buckets and the student -> [N].

    student_logits: [N, V] any float dtype (computed in float32; float64 stays float64).
    topk_ids:       int [N, k], distinct per row (the cache sorts them by log-prob).
    topk_logprobs:  [N, k] the teacher's TRUE log-probs at the dump temperature.
    tail_logmass:   [N] log(1 - sum_j p_j), or None for renormalised top-k.
    divergence:     one of ``DIVERGENCES`` (see ``bucket_divergence`` for the formulas);
                    params: ``beta`` (jsd, default 0.5), ``alpha`` (skl/srkl, default 0.1).
    temperature:    T. The student is log_softmax(z / T); the teacher's buckets are re-tempered
                    by ``teacher_bucket_logprobs`` (exact among the k ids, approximate for the
                    tail). No T^2 factor is applied: scale the loss yourself if you want it.
    topk_mask:      bool [N, k] or None. Variable-k targets (``topp``: a nucleus of each
                    position's ids, padded to k): False marks padding columns, which follow the
                    valid ones; they are an empty bucket on both sides, their ids ignored, and the
                    rest is everything outside the valid ids.

    With a tail the student's buckets are log_softmax(z/T) gathered at the ids and the rest
    ``logsumexp(z/T outside the ids) - logsumexp(z/T)`` (stable; never log(1 - sum p)); the
    result is a true divergence between the coarsened distributions: <= the full-vocabulary
    one, equal at k = V. Without a tail both sides are renormalised over the k ids (the
    student's gradient then only reaches those k logits). No reduction: average with
    ``masked_mean`` over the positions of each term.
    """
    spec = resolve_divergence(divergence, params)
    _check_topk(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature, topk_mask)
    cdt = compute_dtype(student_logits)
    lt = teacher_bucket_logprobs(topk_logprobs, tail_logmass, student_logits.shape[-1], temperature, cdt, topk_mask)
    ls = student_bucket_logprobs(student_logits, topk_ids, tail_logmass is not None, temperature, topk_mask)
    return bucket_divergence(lt, ls, divergence, **spec)


# ---------------------------------------------------------------------------------------------
# Exact (full-vocabulary) and sampled targets


def full_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "fkl",
    temperature: float = 1.0,
    **params,
) -> torch.Tensor:
    """Per-position divergence between the full teacher and student distributions -> [N].

    student_logits, teacher_logits: [N, V] (any float dtype; computed in float32, float64 if
    either is float64). D(log_softmax(t / T), log_softmax(z / T)) over the whole vocabulary
    with ``bucket_divergence``'s formulas (every divergence of ``DIVERGENCES``; params as for
    ``topk_divergence``). The reference for exact mode (``fused_lm_losses(teacher_hidden=...)``,
    with teacher logits h_t W_t^T) and what ``topk_divergence`` reaches at k = V with a tail.
    A -inf teacher logit (a masked id) is a zero-probability bucket. No T^2 factor.
    """
    spec = resolve_divergence(divergence, params)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be [N, V] over the same vocabulary")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cdt = compute_dtype(student_logits, teacher_logits)
    lt = torch.log_softmax(teacher_logits.to(cdt) / temperature, dim=-1)  # [N, V]
    ls = torch.log_softmax(student_logits.to(cdt) / temperature, dim=-1)  # [N, V]
    return bucket_divergence(lt, ls, divergence, **spec)


def check_sampled(N: int, sample_ids, sample_counts, sample_logprobs) -> None:
    """Shapes of the sampled targets ([N, n] each) and counts >= 0 (one device sync)."""
    if (sample_ids.dim() != 2 or sample_ids.shape[0] != N or sample_counts.shape != sample_ids.shape
            or sample_logprobs.shape != sample_ids.shape):
        raise ValueError(
            f"sample_ids {tuple(sample_ids.shape)}, sample_counts {tuple(sample_counts.shape)} and sample_logprobs "
            f"{tuple(sample_logprobs.shape)} must all be [N, n] with N = {N} (the student's positions)")
    if sample_counts.is_floating_point() or sample_counts.is_complex():
        raise ValueError(f"sample_counts must be an integer tensor (draws per id), got {sample_counts.dtype}")
    if sample_counts.numel() and bool((sample_counts < 0).any()):
        bad = (sample_counts < 0).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"sample_counts has negative counts at rows {bad}: the cache's sample counts are corrupt "
                         "(re-dump or verify the cache)")


def sampled_weights(sample_counts: torch.Tensor, sample_logprobs: torch.Tensor, dtype: torch.dtype):
    """Counts [N, n] -> (q [N, n] = c_j / n with n = sum_j c_j (0 for an all-zero row),
    const [N] = sum_j q_j lp_j over the drawn columns only, so padding (-inf) never meets a 0)."""
    live = sample_counts > 0  # [N, n]
    cnt = sample_counts.to(dtype)
    q = cnt / cnt.sum(-1, keepdim=True).clamp_min(1.0)  # [N, n]
    lp = torch.where(live, sample_logprobs.to(dtype), 0.0)
    return q, (q * lp).sum(-1)


def sampled_kl(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    sample_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Unbiased estimate of KL(p || s) per position from n teacher draws -> [N].

    student_logits:  [N, V] any float dtype (computed in float32; float64 stays float64).
    sample_ids:      int [N, n] the distinct drawn ids (padding columns: id 0, count 0).
    sample_counts:   int [N, n] c_j >= 0, how often id j was drawn; n = sum_j c_j per row.
    sample_logprobs: [N, n] the teacher's true log p_j at the dump temperature (-inf on padding).
    temperature:     T of the student only, s = softmax(z / T); the teacher side is the sampling
                     distribution p itself (see the module docstring).

    KL_hat = sum_j (c_j / n) (lp_j - log s_j); E[KL_hat] = KL(p || s) and E[dKL_hat/dz] =
    dKL/dz = (s - p) / T. A single estimate may be negative. Padding columns contribute exactly
    0 in value and gradient (never NaN); a row with no draws gives 0.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_sampled(student_logits.shape[0], sample_ids, sample_counts, sample_logprobs)
    cdt = compute_dtype(student_logits)
    ls = torch.log_softmax(student_logits.to(cdt) / temperature, dim=-1).gather(-1, sample_ids.long())  # [N, n]
    q, const = sampled_weights(sample_counts, sample_logprobs, cdt)
    return const - (q * ls).sum(-1)


