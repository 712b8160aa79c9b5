"""Compact relation targets: a rank-r factor of the teacher's logit Gram per sample (``--relation lowrank:R``).

The relation target of a sample is R = Z Z^T over its N visual positions, Z = H W^T the logits
(design section 2). The default cache stores H [N, D] (bf16: 2 N D bytes, ~3 MB at N = 729,
D = 2048) and M = W^T W once. The compact mode stores instead F [N, r] with R ~ F F^T:

    M = C C^T                      C = Q diag(sqrt(lambda)) from eigh(M), once per teacher
    Zc = H C          [N, D]       so that Zc Zc^T = H M H^T = R exactly
    Zc = U S V^T                   thin SVD;  F = U_r S_r  [N, r]
    ||R - F F^T||_F / ||R||_F = sqrt(sum_{i>r} s_i^4 / sum_i s_i^4)   (Eckart-Young: the best rank r)

F is rounded to the storage dtype (bf16 by default: N r 2 bytes, 93 KB at N = 729, r = 64) and
the relative error recorded per sample is measured after that rounding, against R in float32.
When N < r the factor is exact up to rounding and its extra columns are zero.
"""

from __future__ import annotations

import torch


def gram_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """C [D, D] with C C^T = M for a symmetric PSD M = W^T W [D, D] (float64 eigh; the tiny
    negative eigenvalues rounding can produce are clamped to 0)."""
    lam, q = torch.linalg.eigh(gram.double())
    return (q * lam.clamp_min(0).sqrt()).to(torch.float32)


def parse_lowrank(relation: str) -> int | None:
    """``"lowrank:64"`` -> 64; any other relation mode -> None."""
    if not relation.startswith("lowrank:"):
        return None
    r = int(relation.split(":", 1)[1])
    if r < 1:
        raise ValueError(f"relation {relation!r}: the rank must be >= 1")
    return r


@torch.no_grad()
def relation_factor(hidden: torch.Tensor, c: torch.Tensor, rank: int,
                    store_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, float]:
    """Rank-``rank`` factor of R = H M H^T and its relative Frobenius error after rounding.

    hidden [N, D] the visual hidden states of one sample; c [D, D] = ``gram_sqrt(M)``.
    -> (F [N, rank] in ``store_dtype``, ||R - F F^T||_F / ||R||_F as a float; 0 when N = 0 or R = 0).
    """
    n = hidden.shape[0]
    f = torch.zeros(n, rank, dtype=store_dtype, device=hidden.device)
    if n == 0:
        return f, 0.0
    zc = hidden.float() @ c.to(hidden.device)  # [N, D]
    u, s, _ = torch.linalg.svd(zc.double(), full_matrices=False)  # float64: small singular values matter
    r = min(rank, s.shape[0])
    f[:, :r] = (u[:, :r] * s[:r]).to(store_dtype)
    exact = zc.double() @ zc.double().T  # [N, N]
    approx = f.double() @ f.double().T
    norm = exact.norm()
    err = float((exact - approx).norm() / norm) if norm > 0 else 0.0
    return f, err
