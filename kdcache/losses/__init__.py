"""Loss functions of LLaVA-KD over plain tensors: CE, teacher divergences, relation loss.

Pure functions over torch tensors; nothing here imports the rest of kdcache. Shapes use
N = positions, V = vocabulary, k = cached top-k ids, B = samples, D = hidden width.

    divergences  the divergence names, their parameters and defaults (stdlib only: the config reads it)
    reference    the plain, exact losses over materialised logits: CE, top-k(+tail), exact, sampled
    relation     L_rel from Gram matrices (no [N, V] logits) or from features
    targets      the fused head's teacher targets, one frozen class per kind with its loss chunk
    fused        the fused, chunked LM head + CE + divergence (the trainer's path)

Terms (design section 1), each averaged over its positions by the caller (``masked_mean``):

    L_reg        cross-entropy on response positions                     (``cross_entropy``)
    L_res, L_vis D(teacher || student) at response / visual positions     (``topk_divergence``;
                 exact mode ``full_divergence``; sampled mode ``sampled_kl``)
    L_rel        1 - cos(vec(Y_s Y_s^T), vec(Y_t Y_t^T)) per sample       (``relation_loss``,
                 ``gram_relation`` + ``relation_loss_from_grams`` without the N x V logits)

The names below load their submodule on first use (PEP 562), so ``kdcache.config`` can import
``kdcache.losses.divergences`` without importing torch.
"""

from __future__ import annotations

import importlib

_HOME = {  # public name -> the submodule that defines it
    **dict.fromkeys(("DIVERGENCES", "resolve_divergence", "divergence_params"), "divergences"),
    **dict.fromkeys(("IGNORE_INDEX", "NEG_INF", "masked_mean", "token_cross_entropy", "cross_entropy",
                     "bucket_divergence", "teacher_bucket_logprobs", "student_buckets_from_parts",
                     "student_bucket_logprobs", "topk_divergence", "full_divergence", "sampled_kl"), "reference"),
    **dict.fromkeys(("gram_relation", "relation_loss_from_grams", "relation_loss"), "relation"),
    **dict.fromkeys(("fused_lm_losses", "fused_lm_loss", "head_inputs"), "fused"),
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
