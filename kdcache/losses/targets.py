"""The fused head's teacher targets: one small frozen class per kind, each owning its loss chunk.

A target holds its per-row tensors, prepared and validated once per call by its ``build``
(rows without a KD target get harmless values: finite, weight 0). ``rows(sl)`` is the same
target on a chunk of rows, and ``chunk`` gives that chunk's losses and, given the output
gradients, d(loss)/d(logits):

    chunk(h [c, D], w [V, D], labels long [c] | None, g_ce [c] | None, g_kd [c] | None, head)
        -> Chunk(ce [c] | None, kd [c], dz [c, V] | None)
        dz = sum_i g_ce_i dce_i/dz + g_kd_i dkd_i/dz (None when no gradient is wanted)

    TopkTail    top-k ids + log-probs + tail (LLaVA-KD; the trainer's default): one exp pass
    TopkRenorm  top-k ids + log-probs, renormalised over the k ids (no tail)
    Exact       the teacher's hidden states + LM head: the full distribution, any divergence
    Sampled     drawn ids, counts, log-probs: the unbiased forward-KL estimator

CE shares each chunk's logits and softmax pass: ``softmax_chunk`` is the chunk of CE alone and
the frame of TopkRenorm, Exact and Sampled, which add their divergence through ``kd_part``.
``head`` is the call's ``fused.Head`` (divergence, params, temperature, dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .reference import NEG_INF, bucket_divergence, check_sampled, check_topk_mask, pad_ids_to_first, sampled_weights
from .reference import student_buckets_from_parts, teacher_bucket_logprobs

# A row's rest (outside the ids) holding less than this of exp(u - max u) has its tail taken by an
# exact log-sum-exp instead: float32 exp underflows below e^-103, so such a sum may have lost terms.
_REST_FLOOR = 2.0 ** -60


class Chunk(NamedTuple):
    """One chunk's outputs: ce [c] | None, kd [c] | None, dz [c, V] | None."""

    ce: torch.Tensor | None
    kd: torch.Tensor | None
    dz: torch.Tensor | None


class KdPart(NamedTuple):
    """A divergence's share of a ``softmax_chunk``.

    kd [c]; dz [c, V] | None its gradient so far; softmax_coef [c] | None a per-row coefficient of
    softmax(z) still to add (served by the pass CE makes anyway); lse_z [c] | None logsumexp(z)
    if it computed one; scatter (ids [c, n], values [c, n]) | None still to add into dz.
    """

    kd: torch.Tensor
    dz: torch.Tensor | None = None
    softmax_coef: torch.Tensor | None = None
    lse_z: torch.Tensor | None = None
    scatter: tuple[torch.Tensor, torch.Tensor] | None = None


def kd_mask_or_all(kd_mask: torch.Tensor | None, N: int, device) -> torch.Tensor:
    """kd_mask as bool [N], all True when None; a wrong shape is refused."""
    kd_mask = torch.ones(N, dtype=torch.bool, device=device) if kd_mask is None else kd_mask.bool()
    if tuple(kd_mask.shape) != (N,):
        raise ValueError(f"kd_mask must be [N] = [{N}], got {tuple(kd_mask.shape)}")
    return kd_mask


def _exp_from_max(x: torch.Tensor, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [c, V] (any float dtype, untouched) -> (q [c, V], m [c], s [c]) in ``cdt``:
    q = exp(x - m) with m the row max, s = q.sum(1); logsumexp(x) = m + log s, softmax = q / s."""
    m = x.amax(dim=1).to(cdt)  # [c]
    q = (x - m.unsqueeze(1)).exp_()  # [c, V] a new buffer, promoted to cdt by m
    return q, m, q.sum(1)


def softmax_chunk(h, w, labels, g_ce, g_kd, head, kd_part=None) -> Chunk:
    """CE (and a divergence's ``kd_part``) of one chunk over its float logits z = h W^T.

    ``kd_part(z, lse1, want, g_kd, head) -> KdPart`` (lse1 = logsumexp(z) when there are labels,
    else None). CE's gradient is g_ce (softmax(z) - onehot(label)); the divergence's softmax
    coefficient joins the same pass. Peak: ~2 [c, V] buffers (3 when T != 1).
    """
    want = g_ce is not None or g_kd is not None
    z = (h @ w.T).to(head.cdt)  # [c, V] the chunk's logits (formed once per call)
    ce = lse1 = None
    if labels is not None:
        lse1 = torch.logsumexp(z, dim=-1)  # [c]
        ce = lse1 - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    soft_coef = g_ce if (want and labels is not None) else None  # per-row coefficient of softmax(z)
    part = None if kd_part is None else kd_part(z, lse1, want, g_kd, head)
    kd = dz = scatter = lse_z = None
    if part is not None:
        kd, dz, scatter = part.kd, part.dz, part.scatter
        lse_z = part.lse_z
        if part.softmax_coef is not None:
            soft_coef = part.softmax_coef if soft_coef is None else soft_coef + part.softmax_coef
    if soft_coef is not None:
        lse_z = lse1 if lse1 is not None else lse_z  # both are logsumexp(z) here
        p = z.sub_(lse_z.unsqueeze(1)).exp_().mul_(soft_coef.unsqueeze(1))  # in place: z is done
        dz = p if dz is None else dz.add_(p)
    if want and (labels is not None or scatter is not None):
        if dz is None:
            dz = torch.zeros_like(z)
        if scatter is not None:
            dz.scatter_add_(1, *scatter)
        if labels is not None:
            dz.scatter_add_(1, labels.unsqueeze(1), -g_ce.unsqueeze(1))
    return Chunk(ce, kd, dz)


def _topk_ids_logprobs(topk_ids, topk_logprobs, tail_logmass, kd_mask, N: int, V: int, cdt, topk_mask=None):
    """Validate top-k targets; rows without a target get distinct in-range ids and a flat
    teacher -> (ids long [N, k], log-probs [N, k] in ``cdt``, tail [N] | None, kd_mask [N],
    topk_mask [N, k] | None with padding ids set to their row's first id)."""
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
    dev = topk_ids.device
    kd_mask = kd_mask_or_all(kd_mask, N, dev)
    row = kd_mask.unsqueeze(1)
    if topk_mask is not None:  # rows without a target: all k columns valid (distinct ids below)
        topk_mask = topk_mask | ~row
        check_topk_mask(topk_mask, topk_ids.shape)
    ids = torch.where(row, topk_ids.long(), torch.arange(k, device=dev))
    if topk_mask is not None:
        ids = pad_ids_to_first(ids, topk_mask)
    lp = torch.where(row, topk_logprobs.to(cdt), 0.0)
    tail = None if tail_logmass is None else torch.where(kd_mask, tail_logmass.to(cdt), 0.0)
    return ids, lp, tail, kd_mask, topk_mask


@dataclass(frozen=True)
class TopkTail:
    """Top-k + tail buckets (``reference.topk_divergence`` with a tail).

    ids long [N, k] distinct per row; lt [N, k+1] the teacher's bucket log-probs at T (``cdt``);
    mask bool [N, k] | None: variable-k targets (nucleus), False on padding columns (their ids
    repeat the row's first, their buckets are empty on both sides).
    """

    ids: torch.Tensor
    lt: torch.Tensor
    mask: torch.Tensor | None = None

    @classmethod
    def build(cls, topk_ids, topk_logprobs, tail_logmass, kd_mask, N: int, V: int, head, topk_mask=None):
        ids, lp, tail, kd_mask, mask = _topk_ids_logprobs(topk_ids, topk_logprobs, tail_logmass, kd_mask, N, V,
                                                          head.cdt, topk_mask)
        return cls(ids, teacher_bucket_logprobs(lp, tail, V, head.temperature, head.cdt, mask), mask), kd_mask

    def rows(self, sl: slice) -> "TopkTail":
        return TopkTail(self.ids[sl], self.lt[sl], None if self.mask is None else self.mask[sl])

    def chunk(self, h, w, labels, g_ce, g_kd, head) -> Chunk:
        """One exp pass per softmax.

        With u = z / T and q = exp(u - max u) [c, V], one buffer gives every [c, V] quantity:
        lse_all = max + log(sum q); zeroing q at the ids and summing gives the student's rest mass
        S (lse_tail = max + log S) without a second [c, V] log-sum-exp; and the gradient is q times
        one coefficient per row plus k corrections at the ids (p = q / s, s = sum q):
            dkd/du_v = [v = id_j] (g_uk_j + g_all p_v) + [v in rest] q_v (g_all / s + g_tail / S)
        At T = 1, CE's g_ce (softmax(z) - onehot(label)) joins the same q. Rows whose S is below
        ``_REST_FLOOR`` (the top-k holds all but ~1e-18 of the student's mass) take lse_tail and
        the within-rest gradient from an exact log-sum-exp over their rest (one host sync per chunk
        checks for them). About 5 [c, V] memory passes where a plain path makes ~14.

        With a mask, padding columns get u_k = -inf and p_k = 0 (their ids repeat a valid one, so
        zeroing q at the ids zeroes the valid set only), and a row whose valid ids are the whole
        vocabulary has an empty rest (-inf, no gradient).
        """
        ids, lt, cdt, mask = self.ids, self.lt, head.cdt, self.mask
        want = g_ce is not None or g_kd is not None
        z = h @ w.T  # [c, V] the chunk's logits in the matmul dtype (formed once per chunk)
        V = z.shape[-1]
        T = head.temperature
        u = z if T == 1.0 else z.to(cdt) / T  # [c, V]
        q, m, s = _exp_from_max(u, cdt)  # [c, V] exp(u - m), [c], [c]
        lse_all = m + s.log()  # [c]
        u_k = u.gather(1, ids).to(cdt)  # [c, k]
        p_k = q.gather(1, ids) / s.unsqueeze(1)  # [c, k] softmax(u) at the ids
        full = None
        if mask is not None:
            u_k = u_k.masked_fill(~mask, NEG_INF)
            p_k = p_k.masked_fill(~mask, 0.0)
            full = mask.sum(1) >= V  # [c] rows whose rest is empty
        ce = qz = sz = None
        if labels is not None:
            if T == 1.0:
                lse_z = lse_all
            else:  # CE is at T = 1: its own softmax of z
                qz, mz, sz = _exp_from_max(z, cdt)
                lse_z = mz + sz.log()
            ce = lse_z - z.gather(1, labels.unsqueeze(1)).squeeze(1).to(cdt)
        has_rest = ids.shape[1] < V if mask is None else not bool(full.all())
        q.scatter_(1, ids, 0.0)  # [c, V] now exp(u - m) outside the ids only
        low_rows = rest_rows = None
        if has_rest:
            S = q.sum(1)  # [c]
            low = S < _REST_FLOOR
            if full is not None:
                low = low & ~full  # an empty rest is not a small one
            lse_tail = m + S.clamp(min=torch.finfo(cdt).tiny).log()
            if full is not None:
                lse_tail = lse_tail.masked_fill(full, NEG_INF)
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
            kd_rows = bucket_divergence(lt, student_buckets_from_parts(uk, la, lr), head.divergence,
                                        **head.params)  # [c]
            grads = torch.autograd.grad((kd_rows * g_kd).sum(), leaves) if want else None
        kd = kd_rows.detach()
        if not want:
            return Chunk(ce, kd, None)
        g_uk, g_all = grads[0], grads[1]
        coef = g_all if (labels is None or T != 1.0) else g_all + g_ce  # [c] of softmax(u)
        row_coef = coef / s  # [c] of q on the rest
        if has_rest:
            g_tail = grads[2]
            if full is not None:  # an empty rest: S = 0 and no gradient
                g_tail = g_tail.masked_fill(full, 0.0)
                low = low | full
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
        return Chunk(ce, kd, dz)


@dataclass(frozen=True)
class TopkRenorm:
    """Renormalised top-k (``reference.topk_divergence`` without a tail): the divergence depends
    on u_k = z_ids / T alone, so dkd/du is autograd over the [c, k] graph scattered at the ids.

    ids long [N, k]; lt [N, k] the teacher's renormalised log-probs at T (``cdt``); mask bool
    [N, k] | None as for ``TopkTail`` (padding columns: -inf on both sides).
    """

    ids: torch.Tensor
    lt: torch.Tensor
    mask: torch.Tensor | None = None

    @classmethod
    def build(cls, topk_ids, topk_logprobs, kd_mask, N: int, V: int, head, topk_mask=None):
        ids, lp, _, kd_mask, mask = _topk_ids_logprobs(topk_ids, topk_logprobs, None, kd_mask, N, V, head.cdt,
                                                       topk_mask)
        return cls(ids, teacher_bucket_logprobs(lp, None, V, head.temperature, head.cdt, mask), mask), kd_mask

    def rows(self, sl: slice) -> "TopkRenorm":
        return TopkRenorm(self.ids[sl], self.lt[sl], None if self.mask is None else self.mask[sl])

    def chunk(self, h, w, labels, g_ce, g_kd, head) -> Chunk:
        return softmax_chunk(h, w, labels, g_ce, g_kd, head, self.kd_part)

    def kd_part(self, z, lse1, want, g_kd, head) -> KdPart:
        ids, T = self.ids, head.temperature
        u_k = z.gather(1, ids) if T == 1.0 else z.gather(1, ids) / T  # [c, k]
        with torch.enable_grad():
            uk = u_k.detach().requires_grad_(want)
            su = uk if self.mask is None else uk.masked_fill(~self.mask, NEG_INF)
            kd_rows = bucket_divergence(self.lt, torch.log_softmax(su, dim=-1), head.divergence, **head.params)
            grads = torch.autograd.grad((kd_rows * g_kd).sum(), [uk]) if want else None
        dz = None
        if want:
            dz = torch.zeros_like(z).scatter_add_(1, ids, grads[0] if T == 1.0 else grads[0] / T)
        return KdPart(kd_rows.detach(), dz)


@dataclass(frozen=True)
class Exact:
    """The teacher's full distribution (``reference.full_divergence`` with teacher logits
    h_t W_t^T): t_hidden [N, D_t] (zero on rows without a target: a uniform teacher) and
    t_weight [V, D_t], in the teacher's own dtype, never differentiated.

    Each chunk forms lt = log_softmax(h_t W_t^T / T) [c, V] (one more matmul, outside autocast,
    in the teacher dtype promoted with float32). Forward KL's gradient is closed-form, dkd/du =
    g_kd (softmax(u) - exp(lt)); the other divergences take autograd over this chunk's [c, V]
    graph (exact, more buffers).
    """

    t_hidden: torch.Tensor
    t_weight: torch.Tensor

    @classmethod
    def build(cls, teacher_hidden, teacher_lm_weight, kd_mask, N: int, V: int, head):
        if (teacher_hidden.dim() != 2 or teacher_lm_weight.dim() != 2 or teacher_hidden.shape[0] != N
                or teacher_lm_weight.shape[0] != V or teacher_hidden.shape[1] != teacher_lm_weight.shape[1]):
            raise ValueError(f"teacher_hidden must be [N, D_t] with N = {N} and teacher_lm_weight [V, D_t] with the "
                             f"student's V = {V}; got {tuple(teacher_hidden.shape)} and "
                             f"{tuple(teacher_lm_weight.shape)}")
        kd_mask = kd_mask_or_all(kd_mask, N, teacher_hidden.device)
        # Rows without a target get a zero hidden state (a uniform teacher): finite, weight 0.
        return cls(torch.where(kd_mask.unsqueeze(1), teacher_hidden.detach(), 0), teacher_lm_weight.detach()), kd_mask

    def rows(self, sl: slice) -> "Exact":
        return Exact(self.t_hidden[sl], self.t_weight)

    def chunk(self, h, w, labels, g_ce, g_kd, head) -> Chunk:
        return softmax_chunk(h, w, labels, g_ce, g_kd, head, self.kd_part)

    def kd_part(self, z, lse1, want, g_kd, head) -> KdPart:
        T, cdt = head.temperature, head.cdt
        u = z if T == 1.0 else z / T  # [c, V]
        lse_all = lse1 if (T == 1.0 and lse1 is not None) else torch.logsumexp(u, dim=-1)  # [c]
        zt = self.t_hidden @ self.t_weight.T  # [c, V] teacher logits in the teacher's own dtype (no grad)
        lt = torch.log_softmax(zt.to(torch.promote_types(zt.dtype, torch.float32)) / T, dim=-1).to(cdt)  # [c, V]
        del zt
        dz = soft = None
        if head.divergence == "fkl":
            ls = u - lse_all.unsqueeze(1) if T == 1.0 else u.sub_(lse_all.unsqueeze(1))  # [c, V]
            kd = bucket_divergence(lt, ls, "fkl")
            if want:
                du = lt.exp_().mul_(-g_kd.unsqueeze(1))  # -g t  [c, V]
                if T == 1.0:  # + g softmax(z): CE's softmax pass serves it
                    soft = g_kd
                else:
                    du.add_(ls.exp_().mul_(g_kd.unsqueeze(1))).div_(T)
                dz = du
            del ls
        else:
            with torch.enable_grad():
                uu = u.detach().requires_grad_(want)
                kd_rows = bucket_divergence(lt, torch.log_softmax(uu, dim=-1), head.divergence, **head.params)  # [c]
                du = torch.autograd.grad((kd_rows * g_kd).sum(), uu)[0] if want else None
            kd = kd_rows.detach()
            if want:
                dz = du if T == 1.0 else du.div_(T)
            del uu, kd_rows
        return KdPart(kd, dz, softmax_coef=soft, lse_z=lse_all)


@dataclass(frozen=True)
class Sampled:
    """Drawn ids with counts (``reference.sampled_kl``; forward KL only).

    ids long [N, n] (0 on padding), q [N, n] = c_j / n (``cdt``), const [N] = sum_j q_j lp_j.
    kd = const - sum_j q_j u_j + m lse(u) with m = sum_j q_j (1, or 0 without draws), so
    dkd/du = g_kd (m softmax(u) - scatter(q)): one softmax pass shared with CE at T = 1.
    """

    ids: torch.Tensor
    q: torch.Tensor
    const: torch.Tensor

    @classmethod
    def build(cls, sample_ids, sample_logprobs, sample_counts, tail_logmass, kd_mask, N: int, V: int, head):
        if sample_ids is None or sample_logprobs is None:
            raise ValueError("sample_counts (sampled mode) needs topk_ids and topk_logprobs: the drawn ids and "
                             "their teacher log-probs")
        if tail_logmass is not None:
            raise ValueError("sampled mode takes no tail_logmass: the draws already stand for the whole distribution")
        if head.divergence != "fkl":
            raise ValueError(f"sampled targets support divergence 'fkl' only (got {head.divergence!r}): sum_j c_j/n "
                             "(lp_j - log s_j) is unbiased for forward KL alone; use exact or top-k targets for "
                             "other divergences")
        if sample_counts.shape != sample_ids.shape:  # before the masking below could broadcast it
            raise ValueError(f"sample_counts {tuple(sample_counts.shape)} must have topk_ids' shape "
                             f"{tuple(sample_ids.shape)} ([N, n]: one count per drawn id)")
        kd_mask = kd_mask_or_all(kd_mask, N, sample_ids.device)
        counts = torch.where(kd_mask.unsqueeze(1), sample_counts, 0)  # [N, n] rows without a target draw nothing
        check_sampled(N, sample_ids, counts, sample_logprobs)
        ids = torch.where(counts > 0, sample_ids.long(), 0)  # [N, n] padding may hold anything
        q, const = sampled_weights(counts, sample_logprobs, head.cdt)  # [N, n] c_j / n, [N] sum_j q_j lp_j
        return cls(ids, q, const), kd_mask

    def rows(self, sl: slice) -> "Sampled":
        return Sampled(self.ids[sl], self.q[sl], self.const[sl])

    def chunk(self, h, w, labels, g_ce, g_kd, head) -> Chunk:
        return softmax_chunk(h, w, labels, g_ce, g_kd, head, self.kd_part)

    def kd_part(self, z, lse1, want, g_kd, head) -> KdPart:
        T, ids, q = head.temperature, self.ids, self.q
        u = z if T == 1.0 else z / T  # [c, V]
        lse_all = lse1 if (T == 1.0 and lse1 is not None) else torch.logsumexp(u, dim=-1)  # [c]
        mass = q.sum(1)  # [c] sum_j q_j: 1, or 0 on a row without draws
        kd = self.const - (q * u.gather(1, ids)).sum(1) + mass * lse_all  # [c]
        if not want:
            return KdPart(kd, lse_z=lse_all)
        gm = g_kd * mass  # [c] coefficient of softmax(u)
        neg_q = q * -g_kd.unsqueeze(1)  # [c, n]
        if T == 1.0:  # CE's softmax pass serves it; the scatter waits for dz to exist
            return KdPart(kd, softmax_coef=gm, lse_z=lse_all, scatter=(ids, neg_q))
        dz = u.sub_(lse_all.unsqueeze(1)).exp_().mul_(gm.unsqueeze(1))  # u is its own buffer here
        dz.scatter_add_(1, ids, neg_q).div_(T)
        return KdPart(kd, dz, lse_z=lse_all)
