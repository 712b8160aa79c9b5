"""The teacher record: what the teacher says about one sample, for the cache and for online KD.

``kdcache.teacher.teacher_records`` makes these from a model; ``kdcache.cache.writer`` stores
them; ``kdcache.cache.reader`` gives them back; the trainer feeds them to the losses. Fields
are torch tensors (CPU after the cache, the model's device in online mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TARGET_MODES = ("topk", "hidden", "sampled")
MAX_DRAWS = 65535  # sample_counts are stored as uint16


def parse_targets(targets: str) -> tuple[str, int | None]:
    """``"topk"`` -> ("topk", None), ``"hidden"`` -> ("hidden", None), ``"sampled:N"`` -> ("sampled", N).

    topk       the k most probable ids, their log-probs and the tail log-mass (LLaVA-KD, default)
    hidden     exact: top-k as above plus the LM head's input H at every distilled position (the
               full distribution is softmax(H W^T / T) with the teacher's LM head W, stored once)
    sampled:N  N ids drawn with replacement from softmax(z / T) per position (Anshumann et al.
               2025): distinct ids, their true log-probs, draw counts, and the tail outside them
    Raises ValueError (TypeError for a non-string) naming the accepted forms.
    """
    forms = f"accepted: topk, hidden, sampled:N with 1 <= N <= {MAX_DRAWS}"
    if not isinstance(targets, str):
        raise TypeError(f"targets: {targets!r} is not a string ({forms})")
    if targets in ("topk", "hidden"):
        return targets, None
    head, sep, tail = targets.partition(":")
    if head == "sampled" and sep and tail.isdigit() and tail == str(int(tail)):
        n = int(tail)
        if 1 <= n <= MAX_DRAWS:
            return "sampled", n
        raise ValueError(f"targets: {targets!r} draws {n} ids per position ({forms})")
    raise ValueError(f"targets: {targets!r} is not a target mode ({forms})")


@dataclass
class TeacherRecord:
    sample_id: str
    row: int  # row of the sample in the LLaVA JSON the cache was dumped from
    input_ids: torch.Tensor  # int32 [T]   the teacher-forced sequence (image span expanded)
    roles: torch.Tensor  # uint8 [T]   kdcache.positions.ROLE_*
    positions: torch.Tensor  # int32 [P]   distilled output positions, sorted
    kinds: torch.Tensor  # uint8 [P]   kdcache.positions.KIND_* of each position
    topk_ids: torch.Tensor  # int32 [P, k] sorted by log-prob, descending
    topk_logprobs: torch.Tensor  # float [P, k] true log-probs (full-vocabulary log-softmax)
    tail_logmass: torch.Tensor  # float32 [P]  log(1 - sum exp(topk_logprobs)); -inf at k = V
    visual_hidden: torch.Tensor | None  # [N_vis, D] final-normed hidden states in the image span
    sample_counts: torch.Tensor | None = None  # int [P, n] draws per id (targets sampled:n); 0 on padding columns
    position_hidden: torch.Tensor | None = None  # [P, D] teacher's final-normed hidden state at every distilled position (targets hidden)
    # relation lowrank:R (kdcache.relation): F [N_vis, R] with F F^T ~ H M H^T, stored instead of visual_hidden
    visual_factor: torch.Tensor | None = None
    relation_error: float | None = None  # ||H M H^T - F F^T||_F / ||H M H^T||_F of that factor (lowrank:R)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])
