"""The teacher record: what the teacher says about one sample, for the cache and for online KD.

``kdcache.teacher.teacher_records`` makes these from a model; ``kdcache.cache.writer`` stores
them; ``kdcache.cache.reader`` gives them back; the trainer feeds them to the losses. Fields
are torch tensors (CPU after the cache, the model's device in online mode). Which per-position
fields a record fills is its target kind's (``kdcache.target_kinds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
