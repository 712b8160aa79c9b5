"""Relation distillation (RDist, design section 1): L_rel = 1 - cos(vec(Y_s Y_s^T), vec(Y_t Y_t^T)) per sample.

Y is the vocabulary logits at the visual positions by default. Logits are Z = H W^T, so
Z Z^T = H (W^T W) H^T: ``gram_relation`` takes M = W^T W (``kdcache.relation.lm_gram``) and
never forms the [B, N, V] logits; ``relation_loss`` is the plain version over materialised
features. Shapes: B = samples, N = visual positions, D = hidden width.
"""

from __future__ import annotations

import torch

from .reference import compute_dtype


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
    cdt = compute_dtype(h, gram)
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
    cdt = compute_dtype(r_s, r_t)
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


