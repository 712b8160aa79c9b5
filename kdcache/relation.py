"""Compact relation targets: a rank-r factor of the teacher's logit Gram per sample (``--relation lowrank:R``).

The relation target of a sample is R = Z Z^T over its N visual positions, Z = H W^T the logits
(design section 2). The default cache stores H [N, D] (bf16: 2 N D bytes, ~3 MB at N = 729,
D = 2048) and M = W^T W once. The compact mode stores instead F [N, r] with R ~ F F^T:

    M = C C^T                      C = Q diag(sqrt(lambda)) from eigh(M), once per teacher
    Zc = H C          [N, D]       so that Zc Zc^T = H M H^T = R exactly
    Zc = U S V^T                   thin SVD;  F = U_r S_r  [N, r]  (computed as the top-r eigenpairs
                                   of R = Zc Zc^T = U S^2 U^T in float64: the same F, ~100x cheaper)
    ||R - F F^T||_F / ||R||_F = sqrt(sum_{i>r} s_i^4 / sum_i s_i^4)   (Eckart-Young: the best rank r)

F is rounded to the storage dtype (bf16 by default: N r 2 bytes, 93 KB at N = 729, r = 64) and
the relative error recorded per sample is measured after that rounding, against R in float64.
When N < r the factor is exact up to rounding and its extra columns are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


def lm_gram(lm_weight: torch.Tensor) -> torch.Tensor:
    """M = W^T W: lm_weight [V, D] -> [D, D] float32 (float64 if given), differentiable in W.

    Logits are Z = H W^T, so Z Z^T = H M H^T: with M the relation needs no [N, V] matrix (the
    dump stores the teacher's M_t once; the trainer forms the student's M_s once per step).
    """
    w = lm_weight.to(torch.float64 if lm_weight.dtype == torch.float64 else torch.float32)
    return w.T @ w


def gram_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """C [D, D] with C C^T = M for a symmetric PSD M = W^T W [D, D] (float64 eigh; the tiny
    negative eigenvalues rounding can produce are clamped to 0)."""
    lam, q = torch.linalg.eigh(gram.double())
    return (q * lam.clamp_min(0).sqrt()).to(torch.float32)


DEFAULT_RANK = 64  # ~93 KB per sample in bf16 at N = 729 (vs ~2.9 MB for the hidden states at D = 2048)
HIDDEN_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class RelationHidden:
    """``hidden``: the visual hidden states H [N, D] in the hidden dtype (+ the teacher's M = W^T W
    once): R_t = H M H^T, exact, for logit or hidden-state relations."""

    name: ClassVar[str] = "hidden"
    form: ClassVar[str] = "hidden"
    has_targets: ClassVar[bool] = True  # the cache holds L_rel targets
    factored: ClassVar[bool] = False  # a factor F (visual_factor) instead of H

    @property
    def spec(self) -> str:
        return self.name

    @property
    def rank(self) -> int | None:
        return None

    @classmethod
    def parse(cls, text: str):
        return cls() if text == cls.name else None

    def stored(self, hidden: str):
        """The mode the cache records for the dump's ``hidden`` dtype: ``hidden`` with hidden
        ``none`` is ``none`` (the default keeps the caches it always made)."""
        return RelationNone() if hidden == "none" else self

    def check_settings(self, settings: dict, where: str, error: type[Exception], exact_targets: bool) -> None:
        """What the schema cannot say about ``settings.relation`` (``error`` names the caller's)."""

    def index_arrays(self) -> dict[str, tuple[str, int | None]]:
        return {}

    def train_problem(self, cfg, settings: dict) -> str | None:
        """Why this cache's relation targets cannot serve ``cfg``'s L_rel, or None."""
        return None


@dataclass(frozen=True)
class RelationNone(RelationHidden):
    """``none``: no relation targets (L_rel cannot be trained from the cache)."""

    name: ClassVar[str] = "none"
    form: ClassVar[str] = "none"
    has_targets: ClassVar[bool] = False

    def stored(self, hidden: str):
        return self

    def train_problem(self, cfg, settings: dict) -> str | None:
        if not cfg.loss.gamma_rel:
            return None
        return (f"loss.gamma_rel = {cfg.loss.gamma_rel} needs relation targets, but cache "
                f"{cfg.cache} was dumped with relation none (hidden {settings['hidden']}): set "
                "loss.gamma_rel: 0 or dump with --hidden bf16 --relation hidden (or lowrank:64)")


@dataclass(frozen=True)
class RelationLowrank(RelationHidden):
    """``lowrank:R``: a rank-R factor F [N, R] (hidden dtype) with F F^T ~ H M H^T, and its
    relative error per sample (``index/relation_error``); logit relations only."""

    r: int = DEFAULT_RANK
    name: ClassVar[str] = "lowrank"
    form: ClassVar[str] = f"lowrank:R with R >= 1 (lowrank alone: R = {DEFAULT_RANK})"
    factored: ClassVar[bool] = True

    @property
    def spec(self) -> str:
        return f"lowrank:{self.r}"

    @property
    def rank(self) -> int | None:
        return self.r

    @classmethod
    def parse(cls, text: str):
        if text == cls.name:
            return cls(DEFAULT_RANK)
        head, sep, tail = text.partition(":")
        if head == cls.name and sep and tail.isdigit() and tail == str(int(tail)) and int(tail) >= 1:
            return cls(int(tail))
        return None

    def stored(self, hidden: str):
        return self

    def check_settings(self, settings: dict, where: str, error: type[Exception], exact_targets: bool) -> None:
        rel = settings["relation"]
        if settings["hidden"] == "none":
            raise error(f"{where}: settings.relation {rel!r} stores its rows in the hidden dtype, but "
                        "settings.hidden is 'none': choose bf16, fp16 or float32, or relation none")
        if exact_targets:
            raise error(f"{where}: settings.relation {rel!r} with targets 'hidden': that mode stores "
                        "every hidden state already; use relation hidden")

    def index_arrays(self) -> dict[str, tuple[str, int | None]]:
        from kdcache.cache.format import RELATION_INDEX_ARRAYS  # index/relation_error, float32

        return RELATION_INDEX_ARRAYS

    def train_problem(self, cfg, settings: dict) -> str | None:
        lc = cfg.loss
        if lc.gamma_rel and lc.relation_features != "logits":
            return (f"loss.relation_features {lc.relation_features!r} needs the teacher's hidden states, "
                    f"but cache {cfg.cache} has relation {settings['relation']!r}: a factor of the logit Gram "
                    "only. Set loss.relation_features: logits, or dump with --relation hidden")
        return None


RELATION_MODES: dict[str, type[RelationHidden]] = {m.name: m for m in (RelationHidden, RelationNone, RelationLowrank)}


def parse_relation(relation: str) -> RelationHidden:
    """``"hidden"`` -> RelationHidden(), ``"none"`` -> RelationNone(), ``"lowrank:R"`` -> RelationLowrank(R).

    hidden     the visual hidden states H [N, D] (+ the teacher's M = W^T W once): R = H M H^T exact
    none       no relation targets (L_rel cannot be trained from the cache)
    lowrank:R  a rank-R factor F [N, R] with F F^T ~ H M H^T and its relative error per sample
    ``"lowrank"`` alone means ``lowrank:64`` (``DEFAULT_RANK``). Raises ValueError naming the
    accepted forms (TypeError for a non-string).
    """
    forms = "accepted: " + ", ".join(m.form for m in RELATION_MODES.values())
    if not isinstance(relation, str):
        raise TypeError(f"relation: {relation!r} is not a string ({forms})")
    for mode in RELATION_MODES.values():
        parsed = mode.parse(relation)
        if parsed is not None:
            return parsed
    raise ValueError(f"relation: {relation!r} is not a relation mode ({forms})")


def parse_lowrank(relation: str) -> int | None:
    """``"lowrank:64"`` -> 64; any other relation mode -> None."""
    return parse_relation(relation).rank


@torch.no_grad()
def relation_factor(hidden: torch.Tensor, c: torch.Tensor, rank: int,
                    store_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, float]:
    """Rank-``rank`` factor of R = H M H^T and its relative Frobenius error after rounding.

    hidden [N, D] the visual hidden states of one sample; c [D, D] = ``gram_sqrt(M)``.
    -> (F [N, rank] in ``store_dtype``, ||R - F F^T||_F / ||R||_F as a float; 0 when N = 0 or R = 0).
    """
    return relation_factors([hidden], c, rank, store_dtype)[0]


@torch.no_grad()
def relation_factors(hiddens: list[torch.Tensor], c: torch.Tensor, rank: int,
                     store_dtype: torch.dtype = torch.bfloat16) -> list[tuple[torch.Tensor, float]]:
    """``relation_factor`` of many samples, batched over the samples of equal N (one eigh each).

    hiddens: [N_b, D] per sample (any float dtype, any device; the factors stay on it).
    The top-r eigenpairs of R = Zc Zc^T in float64 give F = Q_r sqrt(lambda_r), the same factor as
    the thin SVD of Zc (Eckart-Young for a PSD matrix) but ~100x cheaper at N = 729, D = 2048 on a
    CPU: an [N, N] eigh instead of an [N, D] SVD. Columns past min(N, D) are zero.
    """
    out: list[tuple[torch.Tensor, float] | None] = [None] * len(hiddens)
    by_n: dict[int, list[int]] = {}
    for j, h in enumerate(hiddens):
        by_n.setdefault(int(h.shape[0]), []).append(j)
    for n, js in by_n.items():
        dev = hiddens[js[0]].device
        if n == 0:
            for j in js:
                out[j] = (torch.zeros(0, rank, dtype=store_dtype, device=dev), 0.0)
            continue
        zc = torch.stack([hiddens[j].float() for j in js]) @ c.to(dev, torch.float32)  # [B, N, D]
        zc = zc.double()  # float64: the small eigenvalues set the truncation error
        exact = zc @ zc.transpose(1, 2)  # [B, N, N] = H M H^T
        lam, q = torch.linalg.eigh(exact)  # ascending
        r = min(rank, n, zc.shape[-1])
        top = lam[:, -r:].flip(-1).clamp_min(0)  # [B, r] descending
        f = torch.zeros(len(js), n, rank, dtype=store_dtype, device=dev)  # [B, N, rank]
        f[..., :r] = (q[..., -r:].flip(-1) * top.sqrt().unsqueeze(1)).to(store_dtype)
        fd = f.double()
        approx = fd @ fd.transpose(1, 2)  # [B, N, N] after rounding to the storage dtype
        norm = exact.flatten(1).norm(dim=1)  # [B]
        err = ((exact - approx).flatten(1).norm(dim=1) / norm.clamp_min(1e-300)).where(norm > 0, 0.0)
        for b, (j, e) in enumerate(zip(js, err.tolist())):
            out[j] = (f[b], float(e))
    return out  # type: ignore[return-value]


def factor_records(records: list, c: torch.Tensor, rank: int, store_dtype: torch.dtype) -> list:
    """``TeacherRecord`` s with ``visual_hidden`` -> the same records with ``visual_factor`` [N, rank]
    (``store_dtype``) and ``relation_error`` instead (``visual_hidden`` None): ``relation:
    lowrank:R`` as the dump writes it. c [D, D] = ``gram_sqrt(W^T W)`` of the teacher's LM head."""
    import dataclasses

    for r in records:
        if r.visual_hidden is None:
            raise ValueError(f"sample {r.sample_id!r} (row {r.row}) has no visual_hidden to factor: make the records "
                             "with hidden states (teacher_records(with_hidden=True))")
    facs = relation_factors([r.visual_hidden for r in records], c, rank, store_dtype)
    return [dataclasses.replace(r, visual_hidden=None, visual_factor=f, relation_error=e)
            for r, (f, e) in zip(records, facs)]
