"""The fused LM head: CE and the teacher divergence straight from the LM head's input, in chunks of positions.

``fused_lm_losses`` and ``fused_lm_loss`` compute L_reg's and the divergences' per-position values
from hidden [N, D] and the LM head W [V, D] one chunk of positions at a time, so the student's
[N, V] float32 logits never exist at once; CE and the divergence share each chunk's matmul and
softmax pass. Exact: equal to ``reference.token_cross_entropy`` and the target kind's reference
divergence on hidden @ W^T in values and gradients (tests/losses/test_fused.py, tests/losses/test_fused_loss.py).

    head_inputs(hidden, W, labels=, kd_mask=, topk_ids=, ...)  validate once -> HeadInputs
        HeadInputs: labels/ce_mask, kd_mask, one target of ``kdcache.losses.targets`` (or None), Head
    _chunk_pass(hidden, W, inputs, g_ce, g_kd)  per chunk: target.chunk(...) -> (ce, kd, dz),
        dz folded at once into grad_h[chunk] = dz @ W and grad_W += dz^T @ h_chunk
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .divergences import resolve_divergence
from .reference import IGNORE_INDEX
from .targets import Exact, Sampled, TopkRenorm, TopkTail, softmax_chunk

Target = TopkTail | TopkRenorm | Exact | Sampled


@dataclass(frozen=True)
class Head:
    """The call's settings: divergence and its resolved params, temperature T, chunk rows, the
    matmul dtype (autocast's, else hidden's and W's common dtype) and the compute dtype cdt
    (float64 for float64 inputs, else float32)."""

    divergence: str
    params: dict
    temperature: float
    chunk_size: int
    mm_dtype: torch.dtype
    cdt: torch.dtype


@dataclass(frozen=True)
class HeadInputs:
    """Validated per-call inputs of ``_chunk_pass``.

    labels: long [N] (>= 0: ignored rows replaced by 0) | None; ce_mask: bool [N] | None (label
    != ignore_index); kd_mask: bool [N] | None (None: no divergence); target: the teacher target
    (``kdcache.losses.targets``) | None; head: ``Head``.
    """

    labels: torch.Tensor | None
    ce_mask: torch.Tensor | None
    kd_mask: torch.Tensor | None
    target: Target | None
    head: Head


def head_inputs(
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
    topk_mask: torch.Tensor | None = None,
) -> HeadInputs:
    """Validate the fused head's keywords (the one list of them, with their defaults) -> ``HeadInputs``.

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
    topk_mask:     bool [N, k] with topk_ids: variable-k (nucleus) targets padded to k, False on
                   the padding columns, which follow the valid ones (``topk_divergence``).
    sample_counts: int [N, n] with it, topk_ids / topk_logprobs are the distinct drawn ids and
                   their true log-probs (padding columns: count 0, id 0, log-prob -inf);
                   tail_logmass must be None and divergence "fkl" (the only unbiased one).
    kd_mask:       [N] bool, False on rows without a KD target (their ids/log-probs/counts/
                   teacher hidden states may hold anything: they are replaced by harmless
                   values); None: every row.
    divergence, temperature, params: as for ``topk_divergence`` (params e.g. {"beta": 0.5}).
    chunk_size:    positions per chunk (peak memory ~2-3 [chunk_size, V] float32 buffers).
    """
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
    head = Head(divergence, spec, float(temperature), int(chunk_size), mm_dtype, cdt)

    ce_mask = safe_labels = None
    if labels is not None:
        if tuple(labels.shape) != (N,):
            raise ValueError(f"labels must be [N] = [{N}], got {tuple(labels.shape)}")
        ce_mask = labels != ignore_index
        safe_labels = torch.where(ce_mask, labels, 0).long()

    target = None
    if exact:
        if teacher_hidden is None or teacher_lm_weight is None:
            raise ValueError("exact mode needs both teacher_hidden [N, D_t] and teacher_lm_weight [V, D_t]")
        if topk_ids is not None or topk_logprobs is not None or tail_logmass is not None or sample_counts is not None:
            raise ValueError("teacher_hidden/teacher_lm_weight (exact mode) exclude topk_ids, topk_logprobs, "
                             "tail_logmass and sample_counts: pass one kind of teacher target")
        target, kd_mask = Exact.build(teacher_hidden, teacher_lm_weight, kd_mask, N, V, head)
    elif topk_mask is not None and (sample_counts is not None or topk_ids is None):
        raise ValueError("topk_mask goes with top-k targets (topk_ids + topk_logprobs), not sampled ones")
    elif sample_counts is not None:
        target, kd_mask = Sampled.build(topk_ids, topk_logprobs, sample_counts, tail_logmass, kd_mask, N, V, head)
    elif topk_ids is not None and tail_logmass is not None:
        target, kd_mask = TopkTail.build(topk_ids, topk_logprobs, tail_logmass, kd_mask, N, V, head, topk_mask)
    elif topk_ids is not None:
        target, kd_mask = TopkRenorm.build(topk_ids, topk_logprobs, kd_mask, N, V, head, topk_mask)
    else:
        kd_mask = None  # no divergence (a caller's kd_mask is moot)
    return HeadInputs(safe_labels, ce_mask, kd_mask, target, head)


def _chunk_pass(hidden, weight, inputs: HeadInputs, g_ce=None, g_kd=None, need_h=False, need_w=False):
    """One pass over the positions in chunks -> (ce [N], kd [N], grad_h [N, D] | None, grad_W [V, D] | None).

    With g_ce / g_kd (the weights of the per-position outputs; None: values only) each chunk's
    d(loss)/d(logits) dz is formed from the same logits as its values and folded at once into
    grad_h[chunk] = dz @ W and grad_W += dz^T @ h_chunk, so the vocabulary-sized product runs
    once per chunk for values and gradients together.
    """
    labels, ce_mask, kd_mask, target, head = inputs.labels, inputs.ce_mask, inputs.kd_mask, inputs.target, inputs.head
    cdt, mm_dtype, chunk = head.cdt, head.mm_dtype, head.chunk_size
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
            chunk_labels = None if labels is None else labels[sl]
            chunk_g_ce = None if not want or g_ce is None else g_ce[sl]
            chunk_g_kd = None if not want or g_kd is None else g_kd[sl]
            if target is None:
                ce, kd, dz = softmax_chunk(h_all[sl], w, chunk_labels, chunk_g_ce, chunk_g_kd, head)
            else:
                ce, kd, dz = target.rows(sl).chunk(h_all[sl], w, chunk_labels, chunk_g_ce, chunk_g_kd, head)
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


class _FusedLMHeadLosses(torch.autograd.Function):
    """(hidden [N, D], W [V, D], inputs) -> (ce [N], kd [N]); see ``fused_lm_losses``.

    Forward computes the values chunk by chunk and keeps only its inputs. Backward takes the
    gradients of both per-position vectors (any weighting the caller applied afterwards) and
    recomputes each chunk's logits once to form dz. That extra [c, D] x [D, V] product per chunk
    buys exact gradients for arbitrary output weights; ``fused_lm_loss`` avoids it when the
    weights are known up front (the trainer's case).
    """

    @staticmethod
    def forward(ctx, hidden, weight, inputs):
        ce, kd, _, _ = _chunk_pass(hidden, weight, inputs)
        ctx.save_for_backward(hidden, weight)
        ctx.inputs = inputs
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None
        _, _, grad_h, grad_w = _chunk_pass(hidden, weight, ctx.inputs, g_ce, g_kd, need_h, need_w)
        return grad_h, grad_w, None


class _FusedLMHeadLoss(torch.autograd.Function):
    """(hidden [N, D], W [V, D], ce weight [N], kd weight [N], inputs) -> (loss [], ce [N], kd [N]).

    loss = sum_i w_ce_i ce_i + w_kd_i kd_i. The gradients are formed during the forward pass,
    from the same chunk logits as the values (the logits h W^T are formed once per chunk, not
    twice; the two gradient products follow as in any backward), and kept until backward, which
    only scales them by the incoming gradient. ce and kd are returned for logging and are not
    differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, w_ce, w_kd, need_h, need_w, inputs):
        ce, kd, grad_h, grad_w = _chunk_pass(hidden, weight, inputs, w_ce, w_kd, need_h, need_w)
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

        return scaled(grad_h), scaled(grad_w), None, None, None, None, None


def fused_lm_losses(hidden: torch.Tensor, lm_weight: torch.Tensor, **targets) -> tuple[torch.Tensor | None,
                                                                                         torch.Tensor | None]:
    """Per-position CE and teacher divergence straight from the LM head's input, chunked.

    Equals ``token_cross_entropy(hidden @ W^T, labels)`` and the divergence of the chosen
    target kind on ``hidden @ W^T`` in values and gradients (w.r.t. hidden and W), but the
    logits exist one chunk of ``chunk_size`` positions at a time (computed in float32, or
    float64 for float64 inputs), and CE and the divergence share each chunk's matmul.

    hidden [N, D], lm_weight [V, D]; ``**targets``: the keywords of ``head_inputs`` (labels,
    kd_mask, topk_ids, topk_logprobs, tail_logmass, divergence, temperature, params, chunk_size,
    ignore_index, teacher_hidden, teacher_lm_weight, sample_counts), documented there.
    -> (ce [N] | None, kd [N] | None), float32, 0 on rows without a target, both differentiable:
    reduce them as you like (``masked_mean`` per position kind, weights, sums); the backward
    accepts any gradient for the two vectors.
    """
    inputs = head_inputs(hidden, lm_weight, **targets)
    ce, kd = _FusedLMHeadLosses.apply(hidden, lm_weight, inputs)
    return (ce if inputs.labels is not None else None), (kd if inputs.kd_mask is not None else None)


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
    (``fused_lm_losses``' backward recomputes it), three vocabulary-sized products in all.
    grad_hidden [N, D] and grad_W [V, D] (in W's dtype) are kept from forward to backward, which
    scales them by the incoming gradient (gradient accumulation, loss scaling); when no gradient
    is needed (``torch.no_grad``, frozen inputs) none is formed.

    hidden, lm_weight and ``**targets``: the keywords of ``head_inputs``, as for ``fused_lm_losses``.
    ce_weight:     [N] the weight of each position's CE (e.g. mask / count); None: CE not in the loss
    kd_weight:     [N] the weight of each position's divergence; None: divergence not in the loss
    -> (loss [] differentiable, ce [N] | None, kd [N] | None): the per-position values as
    ``fused_lm_losses`` returns them, detached (for logging). Values and gradients equal
    ``(ce_weight * ce).sum() + (kd_weight * kd).sum()`` over ``fused_lm_losses`` (tested).
    A second backward through the same graph is refused by autograd (the kept gradients are
    scaled in place by the first).
    """
    inputs = head_inputs(hidden, lm_weight, **targets)
    N = hidden.shape[0]
    has_ce, has_kd = inputs.labels is not None, inputs.kd_mask is not None
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
                                          None if w_kd is None else w_kd.detach(), need_h, need_w, inputs)
    return loss, (ce if has_ce else None), (kd if has_kd else None)
