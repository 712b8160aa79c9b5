"""Loss functions of LLaVA-KD over plain tensors: CE, top-k(+tail) divergences, relation loss.

Pure functions over torch tensors; nothing here imports the rest of kdcache. Shapes below use
N = positions, V = vocabulary, k = cached top-k ids, B = samples, D = hidden width.

Terms (design section 1), each averaged over its positions by the caller (``masked_mean``):

    L_reg        cross-entropy on response positions                     (``cross_entropy``)
    L_res, L_vis D(teacher || student) at response / visual positions     (``topk_divergence``;
                 exact mode ``full_divergence``; sampled mode ``sampled_kl``)
    L_rel        1 - cos(vec(Y_s Y_s^T), vec(Y_t Y_t^T)) per sample       (``relation_loss``,
                 ``gram_relation`` + ``relation_loss_from_grams`` without the N x V logits)

``fused_lm_losses`` computes L_reg's and the divergences' per-position values straight from the
LM head's input in chunks of positions, so the student's [N, V] float32 logits never exist at
once; it is exact (tested against the plain path in values and gradients).

Top-k + tail buckets (design section 2). The teacher's distribution at a position is known
through k ids with their true log-probs and the log-mass of "the rest",
``tail = log(1 - sum_j p_j)``. Both distributions are coarsened to the same k+1 buckets

    t = [p_t(id_1), ..., p_t(id_k), p_t(rest)]     s = [p_s(id_1), ..., p_s(id_k), p_s(rest)]

and the divergence is taken between t and s. Coarsening is a Markov map, so by the
data-processing inequality every divergence here is <= its full-vocabulary value, with
equality at k = V (the rest is empty and its bucket contributes exactly 0).

Two more teacher-target kinds (design section 2, "beyond the paper"):

Exact (``targets: hidden``). The cache holds the teacher's final-normed hidden states h_t
[N, D_t] at every distilled position and its LM head W_t [V, D_t] once, so the full teacher
distribution is ``log_softmax(h_t W_t^T / T)``: no coarsening, no bias, and T applies exactly
to both sides. ``full_divergence`` is the plain reference over [N, V] logits;
``fused_lm_losses(teacher_hidden=, teacher_lm_weight=)`` forms the teacher logits one chunk
of positions at a time next to the student's, so neither side's [N, V] ever exists.

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

import inspect
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
NEG_INF = float("-inf")

# Divergence -> its parameters and their defaults (the only defaults; unknown names are refused).
DIVERGENCES: dict[str, dict[str, float]] = {
    "fkl": {},  # KL(t || s)
    "rkl": {},  # KL(s || t)
    "jsd": {"beta": 0.5},  # beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s
    "skl": {"alpha": 0.1},  # KL(t || alpha t + (1 - alpha) s)         (DistiLLM skew KL)
    "srkl": {"alpha": 0.1},  # KL(s || alpha s + (1 - alpha) t)        (DistiLLM skew reverse KL)
    "tvd": {},  # 0.5 sum |t - s|
}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (tight tests), else float32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_divergence(divergence: str, params: dict | None = None) -> dict[str, float]:
    """Validate a divergence name and its parameters -> the full parameter dict.

    Raises ValueError for an unknown divergence (listing the choices), an unknown parameter
    or one out of range.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}: choose from {', '.join(DIVERGENCES)}")
    allowed = DIVERGENCES[divergence]
    params = dict(params or {})
    extra = sorted(set(params) - set(allowed))
    if extra:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise ValueError(f"divergence {divergence!r} takes {takes}; got unknown {extra}")
    out = {**allowed, **{k: float(v) for k, v in params.items()}}
    if "beta" in out and not 0.0 <= out["beta"] <= 1.0:
        raise ValueError(f"jsd beta must lie in [0, 1], got {out['beta']}")
    if "alpha" in out and not 0.0 <= out["alpha"] < 1.0:
        raise ValueError(f"{divergence} alpha must lie in [0, 1), got {out['alpha']}")
    return out


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
    cdt = _compute_dtype(logits)
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
) -> torch.Tensor:
    """Teacher's bucket log-probs: [N, k] (+ [N] tail) -> [N, k+1], or [N, k] without a tail.

    With a tail: ``log_softmax(cat(topk_logprobs, tail_logmass) / T)``. At T = 1 this only
    renormalises (the cached float16 log-probs sum to 1 within rounding, so it is the
    identity up to that rounding and makes t an exact distribution). At T != 1 it is exact for
    the k ids relative to each other but treats the tail as a single atom: the true tempered
    tail would be sum_rest p_v^(1/T), whose inner shape the cache does not know. Without a
    tail (renormalised top-k): ``log_softmax(topk_logprobs / T)`` over the k ids, exact.

    At k = V the rest is empty: the tail is set to -inf whatever was passed (a finite value
    there can only be rounding), so that bucket contributes nothing.
    """
    lp = topk_logprobs.to(dtype)
    if tail_logmass is None:
        return torch.log_softmax(lp / temperature, dim=-1)
    tail = tail_logmass.to(dtype)
    if lp.shape[-1] >= vocab_size:
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


def student_bucket_logprobs(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, with_tail: bool = True, temperature: float = 1.0
) -> torch.Tensor:
    """Student's full distribution coarsened to the teacher's buckets.

    student_logits [N, V] (computed in float32, or float64 if given), topk_ids int [N, k]
    (distinct per row) -> [N, k+1] with_tail (log_softmax(z/T) at the ids, then the rest),
    else [N, k] = log_softmax over the k ids' logits only (renormalised top-k).
    """
    u = student_logits.to(_compute_dtype(student_logits)) / temperature  # [N, V]
    ids = topk_ids.long()
    u_k = u.gather(-1, ids)  # [N, k]
    if not with_tail:
        return torch.log_softmax(u_k, dim=-1)
    return student_buckets_from_parts(u_k, torch.logsumexp(u, dim=-1), _tail_logsumexp(u, ids))


def _check_topk(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature) -> None:
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


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
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

    With a tail the student's buckets are log_softmax(z/T) gathered at the ids and the rest
    ``logsumexp(z/T outside the ids) - logsumexp(z/T)`` (stable; never log(1 - sum p)); the
    result is a true divergence between the coarsened distributions: <= the full-vocabulary
    one, equal at k = V. Without a tail both sides are renormalised over the k ids (the
    student's gradient then only reaches those k logits). No reduction: average with
    ``masked_mean`` over the positions of each term.
    """
    spec = resolve_divergence(divergence, params)
    _check_topk(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature)
    cdt = _compute_dtype(student_logits)
    lt = teacher_bucket_logprobs(topk_logprobs, tail_logmass, student_logits.shape[-1], temperature, cdt)
    ls = student_bucket_logprobs(student_logits, topk_ids, tail_logmass is not None, temperature)
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
    cdt = _compute_dtype(student_logits, teacher_logits)
    lt = torch.log_softmax(teacher_logits.to(cdt) / temperature, dim=-1)  # [N, V]
    ls = torch.log_softmax(student_logits.to(cdt) / temperature, dim=-1)  # [N, V]
    return bucket_divergence(lt, ls, divergence, **spec)


def _check_sampled(N: int, sample_ids, sample_counts, sample_logprobs) -> None:
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


def _sampled_weights(sample_counts: torch.Tensor, sample_logprobs: torch.Tensor, dtype: torch.dtype):
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
    _check_sampled(student_logits.shape[0], sample_ids, sample_counts, sample_logprobs)
    cdt = _compute_dtype(student_logits)
    ls = torch.log_softmax(student_logits.to(cdt) / temperature, dim=-1).gather(-1, sample_ids.long())  # [N, n]
    q, const = _sampled_weights(sample_counts, sample_logprobs, cdt)
    return const - (q * ls).sum(-1)


# ---------------------------------------------------------------------------------------------
# Relation distillation (RDist)


def lm_gram(lm_weight: torch.Tensor) -> torch.Tensor:
    """M = W^T W: lm_weight [V, D] -> [D, D] float32 (float64 if given), differentiable in W.

    Logits are Z = H W^T, so Z Z^T = H M H^T: with M the relation needs no [N, V] matrix.
    """
    w = lm_weight.to(_compute_dtype(lm_weight))
    return w.T @ w


def gram_relation(
    h: torch.Tensor,
    gram: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Relation matrix R = Y Y^T of Y = H W^T without forming Y: R = H M H^T.

    h:    [B, N, D] (or [N, D]) hidden states at the visual positions (the LM head's input).
    gram: [D, D] M = W^T W (``lm_gram``) for logit relations, or None for R = H H^T
          (``relation_features: hidden``).
    mask: [B, N] bool, False on padded rows: they get all-zero rows and columns in R, which is
          exactly leaving them out of the flattened cosine.
    normalize: R of the L2-row-normalised Y, computed as R_ij / sqrt(R_ii R_jj) (exact, since
          R_ii = ||y_i||^2); zero rows stay zero.
    -> R [B, N, N] (or [N, N]) in float32 (float64 if given).
    """
    cdt = _compute_dtype(h, gram)
    x = h.to(cdt)
    if mask is not None:
        if tuple(mask.shape) != tuple(h.shape[:-1]):
            raise ValueError(f"mask {tuple(mask.shape)} must match the rows of h {tuple(h.shape[:-1])}")
        x = x * mask.unsqueeze(-1).to(cdt)
    hm = x if gram is None else x @ gram.to(cdt)  # [B, N, D]
    r = hm @ x.transpose(-1, -2)  # [B, N, N]
    if normalize:
        inv = r.diagonal(dim1=-2, dim2=-1).clamp_min(eps * eps).rsqrt()  # [B, N] = 1 / ||y_i||
        r = r * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    return r


def relation_loss_from_grams(
    r_s: torch.Tensor, r_t: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """Per sample 1 - cos(vec(R_s), vec(R_t)): [B, N, N] x2 -> [B] (or [N, N] x2 -> scalar).

    mask [B, N] bool optionally zeroes padded rows/columns (not needed when ``gram_relation``
    already applied it). A sample whose two matrices are both all-zero (no visual rows) gets
    loss 0: exclude such samples from the mean.
    """
    if r_s.shape != r_t.shape:
        raise ValueError(f"relation matrices differ in shape: student {tuple(r_s.shape)}, teacher {tuple(r_t.shape)}")
    cdt = _compute_dtype(r_s, r_t)
    rs, rt = r_s.to(cdt), r_t.to(cdt)
    if mask is not None:
        m = mask.to(cdt)
        mm = m.unsqueeze(-1) * m.unsqueeze(-2)  # [B, N, N]
        rs, rt = rs * mm, rt * mm
    dims = (-2, -1)
    dot = (rs * rt).sum(dims)
    # vector_norm's backward is 0 (not NaN) at a zero matrix, unlike sqrt(sum(x^2)).
    ns = torch.linalg.vector_norm(rs, dim=dims)
    nt = torch.linalg.vector_norm(rt, dim=dims)
    loss = 1.0 - dot / (ns * nt).clamp_min(eps)
    return torch.where((ns == 0) & (nt == 0), torch.zeros_like(loss), loss)


def relation_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    normalize: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_rel per sample from materialised features: 1 - cos(vec(Y_s Y_s^T), vec(Y_t Y_t^T)) -> [B].

    student_feats [B, N, D_s], teacher_feats [B, N, D_t] (widths may differ: only the N x N
    relations are compared); normalize=True L2-normalises each row of Y first; mask [B, N]
    bool excludes padded rows (ragged visual counts). LLaVA-KD's RDist with Y = logits (or
    hidden states); for logits prefer ``gram_relation``, which never forms the [B, N, V] Y.
    """
    if student_feats.shape[:-1] != teacher_feats.shape[:-1]:
        raise ValueError(
            f"student {tuple(student_feats.shape)} and teacher {tuple(teacher_feats.shape)} features must "
            "share [B, N] (the same visual positions)"
        )
    r_s = gram_relation(student_feats, None, mask=mask, normalize=normalize)
    r_t = gram_relation(teacher_feats, None, mask=mask, normalize=normalize)
    return relation_loss_from_grams(r_s, r_t)


# ---------------------------------------------------------------------------------------------
# Fused LM head + CE + divergence, chunked over positions


# A row's rest (outside the ids) holding less than this of exp(u - max u) has its tail taken by an
# exact log-sum-exp instead: float32 exp underflows below e^-103, so such a sum may have lost terms.
_REST_FLOOR = 2.0 ** -60


def _exp_from_max(x: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [c, V] (any float dtype, untouched) -> (q [c, V], m [c], s [c]) in ``cdt``:
    q = exp(x - m) with m the row max, s = q.sum(1); logsumexp(x) = m + log s, softmax = q / s."""
    m = x.amax(dim=1).to(cdt)  # [c]
    q = (x - m.unsqueeze(1)).exp_()  # [c, V] a new buffer, promoted to cdt by m
    return q, m, q.sum(1)


def _topk_tail_chunk(h, w, cdt, labels, ids, lt, divergence, spec, temperature, g_ce, g_kd):
    """``_head_chunk`` for top-k + tail targets (the trainer's default), one exp pass per softmax.

    With u = z / T and q = exp(u - max u) [c, V], one buffer gives every [c, V] quantity:
    lse_all = max + log(sum q); zeroing q at the ids and summing gives the student's rest mass
    S (lse_tail = max + log S) without a second [c, V] log-sum-exp; and the gradient is q times
    one coefficient per row plus k corrections at the ids (p = q / s, s = sum q):
        dkd/du_v = [v = id_j] (g_uk_j + g_all p_v) + [v in rest] q_v (g_all / s + g_tail / S)
    At T = 1, CE's g_ce (softmax(z) - onehot(label)) joins the same q. Rows whose S is below
    ``_REST_FLOOR`` (the top-k holds all but ~1e-18 of the student's mass) take lse_tail and
    the within-rest gradient from an exact log-sum-exp over their rest (one host sync per chunk
    checks for them). About 5 [c, V] memory passes where the general path makes ~14.
    """
    want = g_ce is not None or g_kd is not None
    z = h @ w.T  # [c, V] the chunk's logits in the matmul dtype (formed once per chunk)
    V = z.shape[-1]
    T = float(temperature)
    u = z if T == 1.0 else z.to(cdt) / T  # [c, V]
    q, m, s = _exp_from_max(u, cdt)  # [c, V] exp(u - m), [c], [c]
    lse_all = m + s.log()  # [c]
    u_k = u.gather(1, ids).to(cdt)  # [c, k]
    p_k = q.gather(1, ids) / s.unsqueeze(1)  # [c, k] softmax(u) at the ids
    ce = qz = sz = None
    if labels is not None:
        if T == 1.0:
            lse_z = lse_all
        else:  # CE is at T = 1: its own softmax of z
            qz, mz, sz = _exp_from_max(z, cdt)
            lse_z = mz + sz.log()
        ce = lse_z - z.gather(1, labels.unsqueeze(1)).squeeze(1).to(cdt)
    has_rest = ids.shape[1] < V
    q.scatter_(1, ids, 0.0)  # [c, V] now exp(u - m) outside the ids only
    low_rows = rest_rows = None
    if has_rest:
        S = q.sum(1)  # [c]
        low = S < _REST_FLOOR
        lse_tail = m + S.clamp(min=torch.finfo(cdt).tiny).log()
        if bool(low.any()):
            low_rows = low.nonzero().squeeze(1)
            rest_rows = u[low_rows].to(cdt).scatter(1, ids[low_rows], NEG_INF)  # [r, V]
            lse_tail[low_rows] = torch.logsumexp(rest_rows, dim=-1)
    else:
        lse_tail = torch.full_like(lse_all, NEG_INF)
    with torch.enable_grad():
        uk = u_k.detach().requires_grad_(want)
        la = lse_all.detach().requires_grad_(want)
        lr = lse_tail.detach().requires_grad_(want and has_rest)
        leaves = [uk, la] + ([lr] if has_rest else [])
        kd_rows = bucket_divergence(lt, student_buckets_from_parts(uk, la, lr), divergence, **spec)  # [c]
        grads = torch.autograd.grad((kd_rows * g_kd).sum(), leaves) if want else None
    kd = kd_rows.detach()
    if not want:
        return ce, kd, None
    g_uk, g_all = grads[0], grads[1]
    coef = g_all if (labels is None or T != 1.0) else g_all + g_ce  # [c] of softmax(u)
    row_coef = coef / s  # [c] of q on the rest
    if has_rest:
        g_tail = grads[2]
        row_coef = row_coef + torch.where(low, 0.0, g_tail / torch.where(low, 1.0, S))
    dz = q.mul_(row_coef.unsqueeze(1))  # [c, V] the rest's entries (the ids' are still 0)
    if low_rows is not None:  # g_tail * softmax within the rest, exactly
        dz.index_add_(0, low_rows, rest_rows.sub_(lse_tail[low_rows].unsqueeze(1)).exp_()
                      .mul_(g_tail[low_rows].unsqueeze(1)))
    dz.scatter_add_(1, ids, g_uk + coef.unsqueeze(1) * p_k)
    if T != 1.0:
        dz.div_(T)
        if labels is not None:
            dz.add_(qz.mul_((g_ce / sz).unsqueeze(1)))
    if labels is not None:
        dz.scatter_add_(1, labels.unsqueeze(1), -g_ce.unsqueeze(1))
    return ce, kd, dz


def _head_chunk(h, w, cdt, labels, ids, lt, with_tail, divergence, spec, temperature, g_ce=None, g_kd=None, *,
                mode="topk", t_hidden=None, t_weight=None, const=None):
    """Losses of one chunk of positions and, given output gradients, d(loss)/d(logits).

    Top-k + tail targets (the trainer's default) take ``_topk_tail_chunk``, which needs fewer
    [c, V] passes; this general path serves exact, sampled and renormalised top-k targets.

    h [c, D] and w [V, D] in the matmul dtype; labels long [c] (>= 0; ignored rows already
    replaced) or None; g_ce / g_kd [c] the gradients of the outputs (backward only; zero on rows
    without a target). The teacher target by ``mode`` (None of them: no divergence):
        "topk"    ids long [c, k] and lt [c, k(+1)] (teacher buckets, ``cdt``) or None;
        "exact"   t_hidden [c, D_t] and t_weight [V, D_t] (teacher dtype); ids, lt None;
        "sampled" ids long [c, n], lt = q [c, n] (c_j / n, ``cdt``), const [c] = sum_j q_j lp_j.
    -> (ce [c] | None, kd [c] | None, dz [c, V] | None), dz = sum_i g_ce_i dce_i/dz + g_kd_i dkd_i/dz.

    Gradient w.r.t. the logits, u = z / T. Renormalised top-k: the divergence depends on u_k
    alone, so dkd/du is autograd over the [c, k] graph scattered at the ids. CE adds
    g_ce (softmax(z) - onehot(label)). Peak: ~2 [c, V] buffers (3 when T != 1).

    Exact mode: teacher log-probs lt = log_softmax(h_t W_t^T / T) [c, V] (one more matmul,
    no grad); forward KL's gradient is closed-form, dkd/du = g_kd (softmax(u) - exp(lt)), the
    other divergences take autograd over this chunk's [c, V] graph (exact, more buffers).
    Sampled mode: kd = const - sum_j q_j u_j + m lse(u) with m = sum_j q_j (1, or 0 without
    draws), so dkd/du = g_kd (m softmax(u) - scatter(q)): one softmax pass shared with CE at T=1.
    """
    if mode == "topk" and ids is not None and with_tail:
        return _topk_tail_chunk(h, w, cdt, labels, ids, lt, divergence, spec, temperature, g_ce, g_kd)
    want = g_ce is not None or g_kd is not None
    z = (h @ w.T).to(cdt)  # [c, V] the chunk's logits (formed once per call)
    T = float(temperature)
    ce = kd = lse1 = lse_all = None
    if labels is not None:
        lse1 = torch.logsumexp(z, dim=-1)  # [c]
        ce = lse1 - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    soft_coef = g_ce if (want and labels is not None) else None  # per-row coefficient of softmax(z)
    dz = None
    scatter = None  # (ids, values) still to add into dz once it exists (sampled mode, T = 1)
    if mode == "exact" and t_hidden is not None:
        u = z if T == 1.0 else z / T  # [c, V]
        lse_all = lse1 if (T == 1.0 and lse1 is not None) else torch.logsumexp(u, dim=-1)  # [c]
        zt = t_hidden @ t_weight.T  # [c, V] teacher logits in the teacher's own dtype (no grad)
        lt = torch.log_softmax(zt.to(torch.promote_types(zt.dtype, torch.float32)) / T, dim=-1).to(cdt)  # [c, V]
        del zt
        if divergence == "fkl":
            ls = u - lse_all.unsqueeze(1) if T == 1.0 else u.sub_(lse_all.unsqueeze(1))  # [c, V]
            kd = bucket_divergence(lt, ls, "fkl")
            if want:
                du = lt.exp_().mul_(-g_kd.unsqueeze(1))  # -g t  [c, V]
                if T == 1.0:  # + g softmax(z): CE's softmax pass serves it
                    soft_coef = g_kd if soft_coef is None else soft_coef + g_kd
                else:
                    du.add_(ls.exp_().mul_(g_kd.unsqueeze(1))).div_(T)
                dz = du
            del ls
        else:
            with torch.enable_grad():
                uu = u.detach().requires_grad_(want)
                kd_rows = bucket_divergence(lt, torch.log_softmax(uu, dim=-1), divergence, **spec)  # [c]
                du = torch.autograd.grad((kd_rows * g_kd).sum(), uu)[0] if want else None
            kd = kd_rows.detach()
            if want:
                dz = du if T == 1.0 else du.div_(T)
            del uu, kd_rows
        del u, lt
    elif mode == "sampled" and ids is not None:
        u = z if T == 1.0 else z / T  # [c, V]
        lse_all = lse1 if (T == 1.0 and lse1 is not None) else torch.logsumexp(u, dim=-1)  # [c]
        mass = lt.sum(1)  # [c] sum_j q_j: 1, or 0 on a row without draws
        kd = const - (lt * u.gather(1, ids)).sum(1) + mass * lse_all  # [c]
        if want:
            gm = g_kd * mass  # [c] coefficient of softmax(u)
            neg_q = lt * -g_kd.unsqueeze(1)  # [c, n]
            if T == 1.0:  # CE's softmax pass serves it; the scatter waits for dz to exist
                soft_coef = gm if soft_coef is None else soft_coef + gm
                scatter = (ids, neg_q)
            else:  # u is its own buffer here
                dz = u.sub_(lse_all.unsqueeze(1)).exp_().mul_(gm.unsqueeze(1))
                dz.scatter_add_(1, ids, neg_q).div_(T)
        del u
    elif mode == "topk" and ids is not None:  # renormalised top-k (with a tail: _topk_tail_chunk)
        u_k = z.gather(1, ids) if T == 1.0 else z.gather(1, ids) / T  # [c, k]
        with torch.enable_grad():
            uk = u_k.detach().requires_grad_(want)
            kd_rows = bucket_divergence(lt, torch.log_softmax(uk, dim=-1), divergence, **spec)  # [c]
            grads = torch.autograd.grad((kd_rows * g_kd).sum(), [uk]) if want else None
        kd = kd_rows.detach()
        if want:
            dz = torch.zeros_like(z).scatter_add_(1, ids, grads[0] if T == 1.0 else grads[0] / T)
    if soft_coef is not None:
        lse_z = lse1 if lse1 is not None else lse_all  # both are logsumexp(z) here
        p = z.sub_(lse_z.unsqueeze(1)).exp_().mul_(soft_coef.unsqueeze(1))  # in place: z is done
        dz = p if dz is None else dz.add_(p)
    if want and (labels is not None or scatter is not None):
        if dz is None:
            dz = torch.zeros_like(z)
        if scatter is not None:
            dz.scatter_add_(1, *scatter)
        if labels is not None:
            dz.scatter_add_(1, labels.unsqueeze(1), -g_ce.unsqueeze(1))
    return ce, kd, dz


def _chunk_pass(hidden, weight, args, g_ce=None, g_kd=None, need_h=False, need_w=False):
    """One pass over the positions in chunks -> (ce [N], kd [N], grad_h [N, D] | None, grad_W [V, D] | None).

    ``args`` = (labels, ce_mask, ids, lt, kd_mask, meta, t_hidden, t_weight, const) as
    ``_prepare`` builds them. With g_ce / g_kd (the weights of the per-position outputs; None:
    values only) each chunk's d(loss)/d(logits) dz is formed from the same logits as its values
    and folded at once into grad_h[chunk] = dz @ W and grad_W += dz^T @ h_chunk, so the
    vocabulary-sized product runs once per chunk for values and gradients together.
    """
    labels, ce_mask, ids, lt, kd_mask, meta, t_hidden, t_weight, const = args
    with_tail, divergence, spec, T, chunk, mm_dtype, cdt, mode = meta
    N = hidden.shape[0]
    ce_out = torch.zeros(N, dtype=cdt, device=hidden.device)
    kd_out = torch.zeros(N, dtype=cdt, device=hidden.device)
    # Rows without a target get exactly zero weight, whatever the caller's weight says.
    want = need_h or need_w
    if want:
        g_ce = None if labels is None else torch.where(ce_mask, g_ce.to(cdt), 0.0)
        g_kd = None if kd_mask is None else torch.where(kd_mask, g_kd.to(cdt), 0.0)
    acc_dtype = torch.promote_types(mm_dtype, torch.float32)  # grad_W sums over all chunks
    grad_h = grad_w = None
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h_all, w = hidden.to(mm_dtype), weight.to(mm_dtype)
        if need_h:
            grad_h = torch.empty_like(h_all)  # [N, D]
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)  # [V, D]
        for s in range(0, N, chunk):
            sl = slice(s, min(s + chunk, N))
            ce, kd, dz = _head_chunk(
                h_all[sl], w, cdt, None if labels is None else labels[sl], None if ids is None else ids[sl],
                None if lt is None else lt[sl], with_tail, divergence, spec, T,
                g_ce=None if not want or g_ce is None else g_ce[sl],
                g_kd=None if not want or g_kd is None else g_kd[sl],
                **_chunk_teacher(sl, mode, t_hidden, t_weight, const))
            if ce is not None:
                ce_out[sl] = ce
            if kd is not None:
                kd_out[sl] = kd
            if want:
                dz = dz.to(mm_dtype)  # [c, V]
                if need_h:
                    grad_h[sl] = dz @ w
                if need_w:
                    if acc_dtype == mm_dtype:
                        grad_w.addmm_(dz.T, h_all[sl])
                    else:
                        grad_w += (dz.T @ h_all[sl]).to(acc_dtype)
            del dz
    if labels is not None:
        ce_out = torch.where(ce_mask, ce_out, 0.0)
    if kd_mask is not None:
        kd_out = torch.where(kd_mask, kd_out, 0.0)
    return (ce_out, kd_out, None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype))


_NO_GRAD_ARGS = (None,) * 9  # no gradient for the targets, masks, meta or the teacher's tensors


class _FusedLMHeadLosses(torch.autograd.Function):
    """(hidden [N, D], W [V, D]) -> (ce [N], kd [N]); see ``fused_lm_losses``.

    Forward computes the values chunk by chunk and keeps only its inputs. Backward takes the
    gradients of both per-position vectors (any weighting the caller applied afterwards) and
    recomputes each chunk's logits once to form dz. That extra [c, D] x [D, V] product per chunk
    buys exact gradients for arbitrary output weights; ``fused_lm_loss`` avoids it when the
    weights are known up front (the trainer's case).
    """

    @staticmethod
    def forward(ctx, hidden, weight, *args):
        ce, kd, _, _ = _chunk_pass(hidden, weight, args)
        ctx.save_for_backward(hidden, weight)
        ctx.args = args
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None, None) + _NO_GRAD_ARGS
        _, _, grad_h, grad_w = _chunk_pass(hidden, weight, ctx.args, g_ce, g_kd, need_h, need_w)
        return (grad_h, grad_w) + _NO_GRAD_ARGS


class _FusedLMHeadLoss(torch.autograd.Function):
    """(hidden [N, D], W [V, D], ce weight [N], kd weight [N]) -> (loss [], ce [N], kd [N]).

    loss = sum_i w_ce_i ce_i + w_kd_i kd_i. The gradients are formed during the forward pass,
    from the same chunk logits as the values (the logits h W^T are formed once per chunk, not
    twice; the two gradient products follow as in any backward), and kept until backward, which only scales them by the incoming gradient. ce and kd
    are returned for logging and are not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, w_ce, w_kd, need_h, need_w, *args):
        ce, kd, grad_h, grad_w = _chunk_pass(hidden, weight, args, w_ce, w_kd, need_h, need_w)
        loss = torch.zeros((), dtype=ce.dtype, device=ce.device)
        if w_ce is not None:
            loss = loss + (w_ce.to(ce.dtype) * ce).sum()
        if w_kd is not None:
            loss = loss + (w_kd.to(kd.dtype) * kd).sum()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        grad_h, grad_w = ctx.saved_tensors

        # In place, without a host sync: the kept gradient is used once (a second backward
        # through the graph is refused by autograd's version check on saved tensors).
        def scaled(g):
            return None if g is None else g.mul_(g_loss.to(g.dtype))

        return (scaled(grad_h), scaled(grad_w), None, None, None, None) + _NO_GRAD_ARGS


def _chunk_teacher(sl: slice, mode: str, t_hidden, t_weight, const) -> dict:
    """``_head_chunk``'s mode-specific teacher arguments for the rows ``sl``."""
    return {"mode": mode, "t_hidden": None if t_hidden is None else t_hidden[sl], "t_weight": t_weight,
            "const": None if const is None else const[sl]}


def fused_lm_losses(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    tail_logmass: torch.Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    params: dict | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    teacher_hidden: torch.Tensor | None = None,
    teacher_lm_weight: torch.Tensor | None = None,
    sample_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-position CE and teacher divergence straight from the LM head's input, chunked.

    Equals ``token_cross_entropy(hidden @ W^T, labels)`` and the divergence of the chosen
    target kind on ``hidden @ W^T`` in values and gradients (w.r.t. hidden and W), but the
    logits exist one chunk of ``chunk_size`` positions at a time (computed in float32, or
    float64 for float64 inputs), and CE and the divergence share each chunk's matmul.

    Teacher targets, at most one kind (none: CE only):
      top-k(+tail)  topk_ids + topk_logprobs (+ tail_logmass)        = ``topk_divergence``
      exact         teacher_hidden + teacher_lm_weight               = ``full_divergence(hidden @ W^T,
                    teacher_hidden @ teacher_lm_weight^T)``, any divergence, exact at any T
      sampled       topk_ids + topk_logprobs + sample_counts, fkl only  = ``sampled_kl``

    hidden:        [N, D] LM-head input at the positions that carry a loss (gather them first).
    lm_weight:     [V, D] the LM head (no bias). The matmul runs in the autocast dtype when
                   autocast is on, else in the common dtype of hidden and W.
    labels:        [N] next-token ids, ``ignore_index`` where there is no CE target; None: no CE.
    topk_ids:      int [N, k]; topk_logprobs [N, k]; tail_logmass [N] or None (renormalised
                   top-k) -- as for ``topk_divergence``. None: no divergence.
    teacher_hidden: [N, D_t] the teacher's final-normed hidden states at the same positions;
    teacher_lm_weight: [V, D_t] its LM head. Each chunk forms the teacher logits by one matmul
                   in the teacher tensors' own dtype (outside autocast), takes the log-softmax
                   at T in that dtype promoted with float32, and never differentiates them.
    sample_counts: int [N, n] with it, topk_ids / topk_logprobs are the distinct drawn ids and
                   their true log-probs (padding columns: count 0, id 0, log-prob -inf);
                   tail_logmass must be None and divergence "fkl" (the only unbiased one).
    kd_mask:       [N] bool, False on rows without a KD target (their ids/log-probs/counts/
                   teacher hidden states may hold anything: they are replaced by harmless
                   values); None: every row.
    divergence, temperature, params: as for ``topk_divergence`` (params e.g. {"beta": 0.5}).
    -> (ce [N] | None, kd [N] | None), float32, 0 on rows without a target, both differentiable:
    reduce them as you like (``masked_mean`` per position kind, weights, sums); the backward
    accepts any gradient for the two vectors.
    """
    args = _prepare(hidden, lm_weight, labels=labels, kd_mask=kd_mask, topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs, tail_logmass=tail_logmass, divergence=divergence,
                    temperature=temperature, params=params, chunk_size=chunk_size, ignore_index=ignore_index,
                    teacher_hidden=teacher_hidden, teacher_lm_weight=teacher_lm_weight, sample_counts=sample_counts)
    ce, kd = _FusedLMHeadLosses.apply(hidden, lm_weight, *args)
    return (ce if labels is not None else None), (kd if args[4] is not None else None)


def fused_lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    *,
    ce_weight: torch.Tensor | None = None,
    kd_weight: torch.Tensor | None = None,
    **targets,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``sum_i ce_weight_i ce_i + kd_weight_i kd_i`` of ``fused_lm_losses``, gradients formed in forward.

    The trainer knows every position's weight before the forward pass (1 / count of valid
    positions per term, times the term's alpha / beta), so the loss is one weighted sum and its
    gradient w.r.t. the logits can be formed from the very chunk logits that give the values:
    the logit product h W^T [c, D] x [D, V] runs once per chunk instead of twice
    (``fused_lm_losses``' backward recomputes it), three vocabulary-sized products in all. grad_hidden [N, D] and grad_W [V, D] (in W's dtype) are kept from forward
    to backward, which scales them by the incoming gradient (gradient accumulation, loss
    scaling); when no gradient is needed (``torch.no_grad``, frozen inputs) none is formed.

    hidden, lm_weight and ``**targets`` (labels, kd_mask, topk_ids, topk_logprobs, tail_logmass,
    divergence, temperature, params, chunk_size, ignore_index, teacher_hidden,
    teacher_lm_weight, sample_counts): exactly as for ``fused_lm_losses``.
    ce_weight:     [N] the weight of each position's CE (e.g. mask / count); None: CE not in the loss
    kd_weight:     [N] the weight of each position's divergence; None: divergence not in the loss
    -> (loss [] differentiable, ce [N] | None, kd [N] | None): the per-position values as
    ``fused_lm_losses`` returns them, detached (for logging). Values and gradients equal
    ``(ce_weight * ce).sum() + (kd_weight * kd).sum()`` over ``fused_lm_losses`` (tested).
    A second backward through the same graph is refused by autograd (the kept gradients are
    scaled in place by the first).
    """
    try:  # fused_lm_losses' keywords, with its defaults
        bound = inspect.signature(fused_lm_losses).bind(hidden, lm_weight, **targets)
    except TypeError as e:
        raise TypeError(f"fused_lm_loss: {e} (it takes fused_lm_losses' keywords)") from None
    bound.apply_defaults()
    args = _prepare(**bound.arguments)
    N = hidden.shape[0]
    has_ce, has_kd = args[0] is not None, args[4] is not None
    for name, wt, present in (("ce_weight", ce_weight, has_ce), ("kd_weight", kd_weight, has_kd)):
        if wt is not None:
            if not present:
                raise ValueError(f"{name} given but there is no {'CE (labels)' if name == 'ce_weight' else 'teacher target'}")
            if tuple(wt.shape) != (N,):
                raise ValueError(f"{name} must be [N] = [{N}], got {tuple(wt.shape)}")
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and lm_weight.requires_grad
    zeros = None
    if (need_h or need_w) and ((has_ce and ce_weight is None) or (has_kd and kd_weight is None)):
        zeros = torch.zeros(N, device=hidden.device)  # a term left out of the loss: weight 0
    w_ce = ce_weight if ce_weight is not None or not has_ce else zeros
    w_kd = kd_weight if kd_weight is not None or not has_kd else zeros
    loss, ce, kd = _FusedLMHeadLoss.apply(hidden, lm_weight, None if w_ce is None else w_ce.detach(),
                                          None if w_kd is None else w_kd.detach(), need_h, need_w, *args)
    return loss, (ce if has_ce else None), (kd if has_kd else None)


def _prepare(hidden, lm_weight, *, labels, kd_mask, topk_ids, topk_logprobs, tail_logmass, divergence, temperature,
             params, chunk_size, ignore_index, teacher_hidden, teacher_lm_weight, sample_counts) -> tuple:
    """Validate ``fused_lm_losses``' arguments -> the per-call tuple ``_chunk_pass`` takes."""
    if hidden.dim() != 2 or lm_weight.dim() != 2 or hidden.shape[1] != lm_weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and lm_weight [V, D]; got {tuple(hidden.shape)} and "
                         f"{tuple(lm_weight.shape)}")
    exact = teacher_hidden is not None or teacher_lm_weight is not None
    if labels is None and topk_ids is None and sample_counts is None and not exact:
        raise ValueError("fused_lm_losses needs labels (CE) and/or a teacher target: topk_ids (top-k or, with "
                         "sample_counts, sampled) or teacher_hidden + teacher_lm_weight (exact)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    spec = resolve_divergence(divergence, params)
    N, V = hidden.shape[0], lm_weight.shape[0]
    dev = hidden.device
    if torch.is_autocast_enabled(dev.type):
        mm_dtype = torch.get_autocast_dtype(dev.type)
    else:
        mm_dtype = torch.promote_types(hidden.dtype, lm_weight.dtype)
    cdt = torch.float64 if mm_dtype == torch.float64 else torch.float32

    ce_mask = safe_labels = None
    if labels is not None:
        if tuple(labels.shape) != (N,):
            raise ValueError(f"labels must be [N] = [{N}], got {tuple(labels.shape)}")
        ce_mask = labels != ignore_index
        safe_labels = torch.where(ce_mask, labels, 0).long()

    ids = lt = t_hidden = t_weight = const = None
    mode = "topk"
    if exact:
        if teacher_hidden is None or teacher_lm_weight is None:
            raise ValueError("exact mode needs both teacher_hidden [N, D_t] and teacher_lm_weight [V, D_t]")
        if topk_ids is not None or topk_logprobs is not None or tail_logmass is not None or sample_counts is not None:
            raise ValueError("teacher_hidden/teacher_lm_weight (exact mode) exclude topk_ids, topk_logprobs, "
                             "tail_logmass and sample_counts: pass one kind of teacher target")
        if (teacher_hidden.dim() != 2 or teacher_lm_weight.dim() != 2 or teacher_hidden.shape[0] != N
                or teacher_lm_weight.shape[0] != V or teacher_hidden.shape[1] != teacher_lm_weight.shape[1]):
            raise ValueError(f"teacher_hidden must be [N, D_t] with N = {N} and teacher_lm_weight [V, D_t] with the "
                             f"student's V = {V}; got {tuple(teacher_hidden.shape)} and "
                             f"{tuple(teacher_lm_weight.shape)}")
        kd_mask = _kd_mask_or_all(kd_mask, N, dev)
        mode = "exact"
        # Rows without a target get a zero hidden state (a uniform teacher): finite, weight 0.
        t_hidden = torch.where(kd_mask.unsqueeze(1), teacher_hidden.detach(), 0)
        t_weight = teacher_lm_weight.detach()
    elif sample_counts is not None:
        if topk_ids is None or topk_logprobs is None:
            raise ValueError("sample_counts (sampled mode) needs topk_ids and topk_logprobs: the drawn ids and "
                             "their teacher log-probs")
        if tail_logmass is not None:
            raise ValueError("sampled mode takes no tail_logmass: the draws already stand for the whole distribution")
        if divergence != "fkl":
            raise ValueError(f"sampled targets support divergence 'fkl' only (got {divergence!r}): sum_j c_j/n "
                             "(lp_j - log s_j) is unbiased for forward KL alone; use exact or top-k targets for "
                             "other divergences")
        if sample_counts.shape != topk_ids.shape:  # before the masking below could broadcast it
            raise ValueError(f"sample_counts {tuple(sample_counts.shape)} must have topk_ids' shape "
                             f"{tuple(topk_ids.shape)} ([N, n]: one count per drawn id)")
        kd_mask = _kd_mask_or_all(kd_mask, N, dev)
        row = kd_mask.unsqueeze(1)
        counts = torch.where(row, sample_counts, 0)  # [N, n] rows without a target draw nothing
        _check_sampled(N, topk_ids, counts, topk_logprobs)
        mode = "sampled"
        ids = torch.where(counts > 0, topk_ids.long(), 0)  # [N, n] padding may hold anything
        lt, const = _sampled_weights(counts, topk_logprobs, cdt)  # [N, n] c_j / n, [N] sum_j q_j lp_j
    elif topk_ids is not None:
        if topk_logprobs is None:
            raise ValueError("topk_ids given without topk_logprobs")
        if topk_ids.dim() != 2 or topk_ids.shape != topk_logprobs.shape or topk_ids.shape[0] != N:
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
                             f"must both be [N, k] with N = {N}")
        k = topk_ids.shape[1]
        if k > V:
            raise ValueError(f"k = {k} exceeds the student's vocabulary V = {V}")
        if tail_logmass is not None and tuple(tail_logmass.shape) != (N,):
            raise ValueError(f"tail_logmass must be [N] = [{N}], got {tuple(tail_logmass.shape)}")
        kd_mask = _kd_mask_or_all(kd_mask, N, dev)
        row = kd_mask.unsqueeze(1)
        # Rows without a target get distinct in-range ids and a flat teacher: finite, weight 0.
        ids = torch.where(row, topk_ids.long(), torch.arange(k, device=dev))
        lp = torch.where(row, topk_logprobs.to(cdt), 0.0)
        tail = None if tail_logmass is None else torch.where(kd_mask, tail_logmass.to(cdt), 0.0)
        lt = teacher_bucket_logprobs(lp, tail, V, temperature, cdt)  # [N, k(+1)]

    else:
        kd_mask = None  # no divergence (a caller's kd_mask is moot)

    meta = (tail_logmass is not None, divergence, spec, float(temperature), int(chunk_size), mm_dtype, cdt, mode)
    return safe_labels, ce_mask, ids, lt, kd_mask, meta, t_hidden, t_weight, const


def _kd_mask_or_all(kd_mask: torch.Tensor | None, N: int, device) -> torch.Tensor:
    """kd_mask as bool [N], all True when None; a wrong shape is refused."""
    kd_mask = torch.ones(N, dtype=torch.bool, device=device) if kd_mask is None else kd_mask.bool()
    if tuple(kd_mask.shape) != (N,):
        raise ValueError(f"kd_mask must be [N] = [{N}], got {tuple(kd_mask.shape)}")
    return kd_mask
