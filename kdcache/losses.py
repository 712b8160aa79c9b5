"""Loss functions of LLaVA-KD over plain tensors: CE, top-k(+tail) divergences, relation loss.

Pure functions over torch tensors; nothing here imports the rest of kdcache. Shapes below use
N = positions, V = vocabulary, k = cached top-k ids, B = samples, D = hidden width.

Terms (design section 1), each averaged over its positions by the caller (``masked_mean``):

    L_reg        cross-entropy on response positions                     (``cross_entropy``)
    L_res, L_vis D(teacher || student) at response / visual positions     (``topk_divergence``)
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
"""

from __future__ import annotations

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


def _head_chunk(h, w, cdt, labels, ids, lt, with_tail, divergence, spec, temperature, g_ce=None, g_kd=None):
    """Losses of one chunk of positions and, given output gradients, d(loss)/d(logits).

    h [c, D] and w [V, D] in the matmul dtype; labels long [c] (>= 0; ignored rows already
    replaced) or None; ids long [c, k] and lt [c, k(+1)] (teacher buckets, ``cdt``) or None;
    g_ce / g_kd [c] the gradients of the outputs (backward only; zero on rows without a target).
    -> (ce [c] | None, kd [c] | None, dz [c, V] | None), dz = sum_i g_ce_i dce_i/dz + g_kd_i dkd_i/dz.

    Gradient of the divergence w.r.t. the logits, with u = z / T, p = softmax(u) and the
    student's buckets written through three small quantities (u_k, lse_all, lse_tail):
        dkd/du_v = [v = id_j] g_uk_j + g_all p_v + g_tail [v in rest] exp(u_v - lse_tail)
    where (g_uk, g_all, g_tail) come from autograd over the [c, k+1] bucket graph only, so
    every divergence gets its exact gradient while the [c, V] work stays three in-place passes.
    CE adds g_ce (softmax(z) - onehot(label)). Peak: ~2 [c, V] buffers (3 when T != 1).
    """
    want = g_ce is not None or g_kd is not None
    z = (h @ w.T).to(cdt)  # [c, V] the chunk's logits: the one vocabulary-sized product
    V = z.shape[-1]
    T = float(temperature)
    ce = kd = lse1 = lse_all = None
    if labels is not None:
        lse1 = torch.logsumexp(z, dim=-1)  # [c]
        ce = lse1 - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    soft_coef = g_ce if (want and labels is not None) else None  # per-row coefficient of softmax(z)
    dz = None
    if ids is not None:
        u = z if T == 1.0 else z / T  # [c, V]
        u_k = u.gather(1, ids)  # [c, k]
        rest = lse_tail = None
        if with_tail:
            lse_all = lse1 if (T == 1.0 and lse1 is not None) else torch.logsumexp(u, dim=-1)
            if ids.shape[1] < V:
                rest = u.scatter(1, ids, NEG_INF)  # [c, V] logits outside the top-k
                lse_tail = torch.logsumexp(rest, dim=-1)
            else:
                lse_tail = torch.full_like(lse_all, NEG_INF)
        with torch.enable_grad():
            uk = u_k.detach().requires_grad_(want)
            leaves = [uk]
            if with_tail:
                la = lse_all.detach().requires_grad_(want)
                lr = lse_tail.detach().requires_grad_(want and rest is not None)
                leaves += [la] + ([lr] if rest is not None else [])
                ls = student_buckets_from_parts(uk, la, lr)  # [c, k+1]
            else:
                ls = torch.log_softmax(uk, dim=-1)  # [c, k]
            kd_rows = bucket_divergence(lt, ls, divergence, **spec)  # [c]
            grads = torch.autograd.grad((kd_rows * g_kd).sum(), leaves) if want else None
        kd = kd_rows.detach()
        if want:
            du = None
            if rest is not None:  # g_tail * softmax within the rest (0 at the ids)
                du = rest.sub_(lse_tail.unsqueeze(1)).exp_().mul_(grads[2].unsqueeze(1))
            if with_tail:
                if T == 1.0:  # softmax(u) is CE's softmax(z): one pass serves both
                    soft_coef = grads[1] if soft_coef is None else soft_coef + grads[1]
                else:  # u is its own buffer here
                    p_t = u.sub_(lse_all.unsqueeze(1)).exp_().mul_(grads[1].unsqueeze(1))
                    du = p_t if du is None else du.add_(p_t)
                    del p_t
            if du is None:
                du = torch.zeros_like(z)
            du.scatter_add_(1, ids, grads[0])
            if T != 1.0:
                du.div_(T)
            dz = du
        del u
    if soft_coef is not None:
        lse_z = lse1 if lse1 is not None else lse_all  # both are logsumexp(z) here
        p = z.sub_(lse_z.unsqueeze(1)).exp_().mul_(soft_coef.unsqueeze(1))  # in place: z is done
        dz = p if dz is None else dz.add_(p)
    if want and labels is not None:
        if dz is None:
            dz = torch.zeros_like(z)
        dz.scatter_add_(1, labels.unsqueeze(1), -g_ce.unsqueeze(1))
    return ce, kd, dz


class _FusedLMHeadLosses(torch.autograd.Function):
    """(hidden [N, D], W [V, D]) -> (ce [N], kd [N]); see ``fused_lm_losses``.

    Forward computes the values chunk by chunk and keeps only its inputs. Backward takes the
    gradients of both per-position vectors (any weighting the caller applied: masked means,
    alpha/beta, gradient accumulation scale) and recomputes each chunk's logits once to form
    grad_hidden[chunk] = dz @ W and grad_W += dz^T @ h_chunk. One extra [c, D] x [D, V] product
    per chunk buys exact gradients for arbitrary output weights with no [N, V] tensor kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ce_mask, ids, lt, kd_mask, meta):
        with_tail, divergence, spec, T, chunk, mm_dtype, cdt = meta
        N = hidden.shape[0]
        ce_out = torch.zeros(N, dtype=cdt, device=hidden.device)
        kd_out = torch.zeros(N, dtype=cdt, device=hidden.device)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h_all, w = hidden.to(mm_dtype), weight.to(mm_dtype)
            for s in range(0, N, chunk):
                sl = slice(s, min(s + chunk, N))
                ce, kd, _ = _head_chunk(
                    h_all[sl], w, cdt, None if labels is None else labels[sl], None if ids is None else ids[sl],
                    None if lt is None else lt[sl], with_tail, divergence, spec, T)
                if ce is not None:
                    ce_out[sl] = ce
                if kd is not None:
                    kd_out[sl] = kd
        if labels is not None:
            ce_out = torch.where(ce_mask, ce_out, 0.0)
        if ids is not None:
            kd_out = torch.where(kd_mask, kd_out, 0.0)
        ctx.save_for_backward(hidden, weight, labels, ce_mask, ids, lt, kd_mask)
        ctx.meta = meta
        return ce_out, kd_out

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        hidden, weight, labels, ce_mask, ids, lt, kd_mask = ctx.saved_tensors
        with_tail, divergence, spec, T, chunk, mm_dtype, cdt = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        none6 = (None,) * 6
        if not (need_h or need_w):
            return (None, None) + none6
        N = hidden.shape[0]
        # Rows without a target get exactly zero weight, whatever the caller's gradient says.
        g_ce = None if labels is None else torch.where(ce_mask, g_ce.to(cdt), 0.0)
        g_kd = None if ids is None else torch.where(kd_mask, g_kd.to(cdt), 0.0)
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)  # grad_W sums over all chunks
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h_all, w = hidden.to(mm_dtype), weight.to(mm_dtype)
            grad_h = torch.empty_like(h_all) if need_h else None  # [N, D]
            grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
            for s in range(0, N, chunk):
                sl = slice(s, min(s + chunk, N))
                _, _, dz = _head_chunk(
                    h_all[sl], w, cdt, None if labels is None else labels[sl], None if ids is None else ids[sl],
                    None if lt is None else lt[sl], with_tail, divergence, spec, T,
                    g_ce=None if g_ce is None else g_ce[sl], g_kd=None if g_kd is None else g_kd[sl])
                dz = dz.to(mm_dtype)  # [c, V]
                if need_h:
                    grad_h[sl] = dz @ w
                if need_w:
                    if acc_dtype == mm_dtype:
                        grad_w.addmm_(dz.T, h_all[sl])
                    else:
                        grad_w += (dz.T @ h_all[sl]).to(acc_dtype)
                del dz
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
        ) + none6


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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-position CE and top-k divergence straight from the LM head's input, chunked.

    Equals ``token_cross_entropy(hidden @ W^T, labels)`` and ``topk_divergence(hidden @ W^T,
    ...)`` in values and gradients (w.r.t. hidden and W), but the logits exist one chunk of
    ``chunk_size`` positions at a time (computed in float32, or float64 for float64 inputs),
    and CE and the divergence share each chunk's matmul.

    hidden:        [N, D] LM-head input at the positions that carry a loss (gather them first).
    lm_weight:     [V, D] the LM head (no bias). The matmul runs in the autocast dtype when
                   autocast is on, else in the common dtype of hidden and W.
    labels:        [N] next-token ids, ``ignore_index`` where there is no CE target; None: no CE.
    topk_ids:      int [N, k]; topk_logprobs [N, k]; tail_logmass [N] or None (renormalised
                   top-k) -- as for ``topk_divergence``. None: no divergence.
    kd_mask:       [N] bool, False on rows without a KD target (their ids/log-probs may hold
                   anything: they are replaced by harmless values); None: every row.
    divergence, temperature, params: as for ``topk_divergence`` (params e.g. {"beta": 0.5}).
    -> (ce [N] | None, kd [N] | None), float32, 0 on rows without a target, both differentiable:
    reduce them as you like (``masked_mean`` per position kind, weights, sums); the backward
    accepts any gradient for the two vectors.
    """
    if hidden.dim() != 2 or lm_weight.dim() != 2 or hidden.shape[1] != lm_weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and lm_weight [V, D]; got {tuple(hidden.shape)} and "
                         f"{tuple(lm_weight.shape)}")
    if labels is None and topk_ids is None:
        raise ValueError("fused_lm_losses needs labels (CE) and/or topk_ids (divergence)")
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

    ids = lt = None
    if topk_ids is not None:
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
        kd_mask = torch.ones(N, dtype=torch.bool, device=dev) if kd_mask is None else kd_mask.bool()
        if tuple(kd_mask.shape) != (N,):
            raise ValueError(f"kd_mask must be [N] = [{N}], got {tuple(kd_mask.shape)}")
        row = kd_mask.unsqueeze(1)
        # Rows without a target get distinct in-range ids and a flat teacher: finite, weight 0.
        ids = torch.where(row, topk_ids.long(), torch.arange(k, device=dev))
        lp = torch.where(row, topk_logprobs.to(cdt), 0.0)
        tail = None if tail_logmass is None else torch.where(kd_mask, tail_logmass.to(cdt), 0.0)
        lt = teacher_bucket_logprobs(lp, tail, V, temperature, cdt)  # [N, k(+1)]

    meta = (tail_logmass is not None, divergence, spec, float(temperature), int(chunk_size), mm_dtype, cdt)
    ce, kd = _FusedLMHeadLosses.apply(hidden, lm_weight, safe_labels, ce_mask, ids, lt, kd_mask, meta)
    return (ce if labels is not None else None), (kd if topk_ids is not None else None)
