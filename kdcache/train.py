"""Train a student: one stage of PT -> DPT -> SFT -> DFT (LLaVA-KD), top-down in this file.

    kdcache train --stage dft --student runs/student-sft --data data/instruct.json \\
        --images data --cache caches/teacher-instruct.zarr --out runs/student-dft

    accelerate launch -m kdcache.cli train ...   # DDP / FSDP / DeepSpeed through accelerate
    torchrun --nproc-per-node 2 -m kdcache.cli train ...               # DDP; on CPU: gloo
    accelerate launch --multi_gpu --num_processes 2 -m kdcache.cli train ...   # same, on CPU too
    (``accelerate launch --cpu --num_processes 2`` starts ONE process unless MPI is installed)

Ranks read disjoint samples: rank r takes every world_size-th sample of the global order, so a
step of N ranks x batch b sees the same samples as one process with batch N*b.

Objective (design section 1), each term averaged over its positions in the batch:
    L = L_reg + alpha_res L_res + beta_vis L_vis + prompt_weight L_prompt + gamma_rel L_rel
pt/sft train on L_reg alone; dpt/dft add the distillation terms from ``--cache`` (offline, the
teacher never loaded) or ``--teacher`` (online: the teacher runs through the same record
function as the dump; the exactness reference). Trainable: the projector (pt, dpt) or the
projector + LLM (sft, dft); the vision tower is always frozen.

Setup -> loop -> save. A checkpoint (``out/checkpoint-<step>/``) holds the model as
``save_pretrained`` safetensors plus optimizer, scheduler, RNG and data position (loaded with
``torch.load(weights_only=True)`` only); a rerun of the same command resumes from the newest one
and continues with the same data order and loss values (``metrics.jsonl`` lines logged after
that checkpoint are dropped first). A finished run (``DONE``) is left alone.

Logs: ``metrics.jsonl`` every ``log_every`` steps (every loss term, lr, grad norm, skipped,
tokens/s, data-wait share), ``samples-rank<r>.jsonl`` with ``log_samples``. A non-finite loss
skips the step on every rank (``on_nan: skip``, logged) or stops the run (``stop``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import losses as L
from .cache.format import CacheCorrupt, CacheMismatch, relation_of
from .config import STAGE_LR, TrainConfig, to_dict, validate
from .losses import IGNORE_INDEX
from .positions import KIND_PROMPT, KIND_RESPONSE, KIND_VISUAL
from .records import TeacherRecord
from .relation import lm_gram
from .target_kinds import Topk, parse_targets

STATE_FILE = "trainer_state.json"


class RunMismatchError(RuntimeError):
    """A rerun into an output directory is another command than the run it would resume."""


# ---------------------------------------------------------------------------------------------
# Data: the (optional) cache drives the order; every sample is re-tokenised and checked.


class SampleJoin:
    """Worker-side transform: a cache record (or a bare row) -> a training item.

    The sample is tokenised here (again: ``training_data`` kept no tokens), in the DataLoader
    worker that serves it, off the training process; memory does not grow with the dataset. Against a
    cache its token ids must equal the cached ones, so a cache from another tokenizer, template or
    data file never trains; the error names the sample.
    """

    def __init__(self, samples, tokenizer, image_processor, images_root, *, template: str, image_token_id: int,
                 num_image_tokens: int, max_length: int | None, truncate: bool):
        self.samples = {s.row: s for s in samples}  # the usable samples (``training_data``'s kept ones)
        self.tokenizer, self.image_processor, self.images_root = tokenizer, image_processor, images_root
        self.kw = dict(template=template, image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                       max_length=max_length, on_too_long="truncate" if truncate else "error")

    def __call__(self, rec):
        from .data.collate import make_item
        from .data.llava import SampleError
        from .data.templates import tokenize_sample

        row = rec.row if isinstance(rec, TeacherRecord) else int(rec)
        if row not in self.samples:
            raise CacheMismatch(f"row {row} of the cache is not a usable sample of this data file "
                                     "(missing, or skipped as bad input): pass the data file the cache was dumped from")
        s = self.samples[row]
        try:
            item = make_item(s, tokenize_sample(s, self.tokenizer, **self.kw), self.image_processor, self.images_root)
        except SampleError as e:
            if not isinstance(rec, TeacherRecord):
                raise
            raise CacheMismatch(f"sample {s.id!r} (row {row}) is in the cache but cannot be used for this "
                                     f"student: {e}") from e
        if isinstance(rec, TeacherRecord):
            if rec.sample_id != item["sample_id"] or not torch.equal(rec.input_ids.long(), item["input_ids"]):
                raise CacheMismatch(
                    f"sample {item['sample_id']!r} (row {row}): the cache's token ids differ from this "
                    f"tokenisation ({rec.num_tokens} cached vs {len(item['input_ids'])} now). The cache was "
                    "dumped with another tokenizer, template, image-token count or data file: dump it again "
                    "for this student."
                )
            item["record"] = rec
        return item


@dataclass
class TrainingData:
    """What the loop draws from: ``source`` (the cache's path, or the kept rows without one),
    ``join`` (row or record -> item, in the loader workers), the samples this run skips and the
    data file's row count."""

    source: str | list[int]
    join: SampleJoin
    skipped: object  # kdcache.data.llava.SkipCounter
    num_rows: int


def training_data(cfg: TrainConfig, processor, model_config) -> TrainingData:
    """Read the data file and find its usable samples: every sample tokenised and checked once,
    over ``num_workers`` processes (the loader's workers are idle until the loop), keeping only
    the kept samples, not their tokens: each is tokenised again by the loader worker that serves
    it (``SampleJoin``), so memory does not grow with the dataset. All skipped: one error."""
    from .data.collate import all_skipped_error, prepare_samples
    from .data.llava import read_llava_json
    from .models import image_token_id, num_image_tokens

    kw = dict(template=cfg.template, image_token_id=image_token_id(model_config),
              num_image_tokens=num_image_tokens(model_config, processor), max_length=cfg.max_length)
    samples = read_llava_json(cfg.data)
    # no tokens kept: tokenised again in the workers (kept, they would grow with the dataset)
    kept, _, skipped = prepare_samples(samples, processor.tokenizer, images_root=cfg.images,
                                       on_too_long=cfg.on_too_long, num_proc=max(1, cfg.num_workers),
                                       keep_tokens=False, **kw)
    if not kept:
        raise all_skipped_error(skipped, cfg.data, cfg.images, f"train {cfg.stage}", "nothing was trained")
    join = SampleJoin(kept, processor.tokenizer, processor.image_processor, cfg.images,
                      truncate=cfg.on_too_long == "truncate", **kw)
    return TrainingData(source=cfg.cache if cfg.cache else [s.row for s in kept], join=join, skipped=skipped,
                        num_rows=len(samples))


class RowDataset(torch.utils.data.IterableDataset):
    """Samples without a cache (pt/sft, online KD) in the same order a one-part cache would
    give: ``kdcache.cache.reader.EpochOrder`` over one part of the kept rows, served lazily
    (``rank_worker_blocks``: a mid-epoch resume costs the same at any position)."""

    def __init__(self, rows, *, seed, epoch, block_size, rank, world_size, start_sample, transform, batch_size):
        super().__init__()
        self.rows, self.transform, self.batch_size = list(rows), transform, batch_size
        self.args = (seed, epoch, block_size, rank, world_size)
        self.start_sample = start_sample

    def __iter__(self):
        from .cache.reader import EpochOrder, rank_worker_blocks

        info = torch.utils.data.get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        seed, epoch, block, rank, world = self.args
        order = EpochOrder([len(self.rows)], seed, epoch, block)
        for _part, idx in rank_worker_blocks(order, rank, world, self.start_sample, worker, nw, self.batch_size):
            for i in idx.tolist():
                yield self.transform(self.rows[i])


RECORD_FIELDS = ("input_ids", "roles", "positions", "kinds", "topk_ids", "topk_logprobs", "tail_logmass",
                 "visual_hidden", "sample_counts", "position_hidden", "visual_factor")
# None in some caches / modes; a record's relation_error (lowrank:R) is not carried: the losses do not read it
OPTIONAL_FIELDS = ("visual_hidden", "sample_counts", "position_hidden", "visual_factor")


def pack_records(records: list[TeacherRecord]) -> dict:
    """Worker side: a batch of records as one tensor per field (rows concatenated) + lengths.

    Every tensor a DataLoader worker returns crosses into the trainer through its own shared-
    memory segment; 8 per record made the transfer, not the cache read, the bottleneck (~4x
    fewer samples/s, ``bench/loader.py``). Packed, a batch costs one segment per field.
    Optional fields (``OPTIONAL_FIELDS``) are packed when the records have them; records of one
    batch come from one cache, so they all have the same ones.
    """
    fields = []
    for f in RECORD_FIELDS:
        have = [getattr(r, f) is not None for r in records]
        if any(have) and not all(have):
            raise ValueError(f"records mix present and absent {f}")
        if all(have):
            fields.append(f)
    return {"sample_id": [r.sample_id for r in records], "row": [r.row for r in records],
            "fields": fields,
            "lengths": torch.tensor([[getattr(r, f).shape[0] for f in fields] for r in records]),  # [B, F]
            **{f: torch.cat([getattr(r, f) for r in records]) for f in fields}}


def unpack_records(packed: dict) -> list[TeacherRecord]:
    """Trainer side: ``pack_records``'s output -> records whose tensors are views (no copy)."""
    fields = packed["fields"]
    split = {f: torch.split(packed[f], packed["lengths"][:, j].tolist()) for j, f in enumerate(fields)}
    return [TeacherRecord(sample_id=sid, row=row, **{f: split[f][b] if f in split else None for f in RECORD_FIELDS})
            for b, (sid, row) in enumerate(zip(packed["sample_id"], packed["row"]))]


class CacheRecordError(CacheCorrupt):
    """A cache record that must not reach the losses (ids outside the vocabulary, non-finite
    values); a CacheCorrupt, so the CLI prints it as one line."""


def _refuse_samples(packed: dict, bad: torch.Tensor, cache: str | None, what: str) -> None:
    """Raise CacheRecordError naming the samples (id and row) at indices ``bad`` [n] of the batch."""
    b = sorted({int(i) for i in bad})
    raise CacheRecordError(
        f"cache {cache}: samples {[packed['sample_id'][i] for i in b]} (rows {[packed['row'][i] for i in b]}) "
        f"{what}: run `kdcache verify {cache}` (it lists every damaged sample) and re-dump the cache")


def check_packed_records(packed: dict, vocab_size: int, cache: str | None) -> None:
    """Vectorised check of a packed batch on the CPU, before anything moves to the device; raises
    CacheRecordError naming the samples (id and row), the array and the fix.

    - topk_ids [P, k] outside ``[0, vocab_size)``: on CUDA such an id in the gather is a
      device-side assert that kills the process, on CPU an IndexError or (with clamping) a
      silently wrong target.
    - NaN or +inf in topk_logprobs [P, k] / tail_logmass [P] (-inf is legitimate: an empty tail
      at k = V, a zero-probability id), any non-finite value in visual_hidden [N_vis, D],
      position_hidden [P, D] or visual_factor [N_vis, R]: they would turn the step's loss into NaN, which ``on_nan`` would
      then blame on the student; a cache holding them is broken, not the run.
    """
    fields = [f for f in RECORD_FIELDS if f in packed]
    owner = {}  # field -> [R] batch index of the sample owning each row of that field

    def rows_of(f: str) -> torch.Tensor:
        if f not in owner:
            n = packed["lengths"][:, fields.index(f)]  # [B] rows per sample
            owner[f] = torch.repeat_interleave(torch.arange(len(packed["sample_id"])), n)
        return owner[f]

    ids = packed["topk_ids"]  # [P, k]
    bad_id = ((ids < 0) | (ids >= vocab_size)).any(dim=1)  # [P]
    if bool(bad_id.any()):
        first = int(bad_id.nonzero()[0, 0])
        _refuse_samples(packed, rows_of("topk_ids")[bad_id], cache,
                        f"have top-k ids outside the student's vocabulary [0, {vocab_size}) "
                        f"(e.g. topk_ids {ids[first].tolist()}); the cache is damaged or from another vocabulary")
    inf = float("inf")
    for f in ("topk_logprobs", "tail_logmass", "visual_hidden", "position_hidden", "visual_factor"):
        if f not in packed:
            continue
        t = packed[f]  # [R] or [R, ...]
        bad = (t.isnan() | (t == inf)) if f in ("topk_logprobs", "tail_logmass") else ~torch.isfinite(t)
        if bad.dim() > 1:  # flatten(1), not reshape(R, -1): a text-only batch has R = 0 visual rows
            bad = bad.flatten(1).any(dim=1)  # [R]
        if bool(bad.any()):
            kind = "NaN or +inf" if f in ("topk_logprobs", "tail_logmass") else "NaN or inf"
            _refuse_samples(packed, rows_of(f)[bad], cache, f"have non-finite {f} ({kind} in {int(bad.sum())} "
                            f"of the batch's {t.shape[0]} rows); the cache is damaged (e.g. a teacher that "
                            "overflowed in fp16)")


def _collate(items, pad_token_id, vocab_size: int, cache: str | None):
    """Worker side: ``kdcache.data.collate.collate`` + the batch's cache records, packed and
    checked (``check_packed_records``) here, off the trainer's main process: its verdict travels
    as ``records["refused"]`` (None, or the CacheRecordError message the trainer raises)."""
    from .data.collate import collate

    batch = collate(items, pad_token_id)
    recs = [it.get("record") for it in items]
    if recs[0] is None:
        batch["records"] = None
        return batch
    packed = pack_records(recs)
    try:
        check_packed_records(packed, vocab_size, cache)
        packed["refused"] = None
    except CacheRecordError as e:
        packed["refused"] = str(e)
    batch["records"] = packed
    return batch


def to_device(packed: dict, device: torch.device) -> dict:
    """A packed batch of records with its field tensors on ``device`` (non-blocking from the
    loader's pinned memory: the copy overlaps the GPU's work); lengths stay on the host."""
    return {k: (v.to(device, non_blocking=True) if k in packed["fields"] else v) for k, v in packed.items()}


def check_cache_against_student(attrs: dict, model, tokenizer, cfg: TrainConfig, n_image: int) -> None:
    """Refuse a cache whose vocabulary, tokenizer, template or visual-token count differ."""
    from .models import tokenizer_hash

    t, tk, st = attrs["teacher"], attrs["tokenizer"], attrs["settings"]
    V = model.lm_head.weight.shape[0]
    problems = []
    if t["vocab_size"] != V:
        problems.append(f"vocabulary: cache {t['vocab_size']}, student {V}")
    if tk["vocab_hash"] != tokenizer_hash(tokenizer):
        problems.append(f"tokenizer: cache {tk['name_or_path']} (hash {tk['vocab_hash']}) differs from the student's")
    if tk["template"] != cfg.template:
        problems.append(f"template: cache {tk['template']!r}, this run {cfg.template!r}")
    if t["num_image_tokens"] != n_image:
        problems.append(f"visual tokens per image: cache {t['num_image_tokens']}, student {n_image}")
    if problems:
        raise CacheMismatch(f"cache {cfg.cache} does not match student {cfg.student}: " + "; ".join(problems))
    if "truncate" in st and (cfg.on_too_long != "truncate" or cfg.max_length != st["max_length"]):
        # the dump cut long samples to its max_length: only the same cut gives the cached token ids
        raise CacheMismatch(f"cache {cfg.cache} cut samples longer than {st['max_length']} tokens (dumped with "
                            f"--on-too-long truncate --max-length {st['max_length']}), this run asks "
                            f"on_too_long {cfg.on_too_long} with max_length {cfg.max_length}: pass "
                            f"--on-too-long truncate --max-length {st['max_length']}")
    lc = cfg.loss
    dumped = set(st["positions"])
    for kind, key, w in (("visual", "beta_vis", lc.beta_vis), ("response", "alpha_res", lc.alpha_res),
                         ("prompt", "prompt_weight", lc.prompt_weight)):
        if w and kind not in dumped:
            raise CacheMismatch(f"loss.{key} = {w} needs {kind} positions, but cache {cfg.cache} was dumped "
                                f"with positions {sorted(dumped)}: set loss.{key}: 0 or dump with "
                                f"--positions including {kind}")
    # the cache's target kind and relation mode say what of this config they cannot serve
    for problem in (parse_targets(st["targets"]).train_problem(cfg, st), relation_of(st).train_problem(cfg, st)):
        if problem is not None:
            raise CacheMismatch(problem)


def missing_rows_message(missing: set[int], skipped, cfg: TrainConfig, settings: dict) -> str:
    """Why cached rows have no sample in this run: this run skipped them (a too-long sample at a
    lower max_length than the dump's, a missing image...), or the data file has fewer rows."""
    why = {row: (sid, reason) for row, sid, reason in skipped.items if row in missing}
    if not why:
        return (f"cache {cfg.cache} holds rows the data file {cfg.data} does not have: {sorted(missing)[:5]}: "
                "pass the data file the cache was dumped from")
    row = min(why)
    sid, reason = why[row]
    fix = (f"pass --max-length {settings['max_length']} (the dump's)" if reason == "too_long"
           else "fix the sample as the skip message says, or re-dump the cache from this data")
    return (f"cache {cfg.cache} holds {len(missing)} sample(s) this run skipped, e.g. sample {sid!r} (row {row} of "
            f"{cfg.data}): {reason} at max_length {cfg.max_length}: {fix}")


# ---------------------------------------------------------------------------------------------
# The objective on one batch


def kd_kinds(cfg: TrainConfig) -> tuple[str, ...]:
    lc = cfg.loss
    kinds = []
    if lc.prompt_weight:
        kinds.append("prompt")
    if lc.beta_vis:
        kinds.append("visual")
    if lc.alpha_res:
        kinds.append("response")
    return tuple(kinds)


@dataclass(frozen=True)
class TeacherSide:
    """What the losses need from the teacher besides the per-sample records.

    gram:        [D_t, D_t] M_t = W_t^T W_t for the logit-space relation loss, or None
    lm_head:     [V, D_t] the teacher's LM head (targets "hidden": the exact mode), else None
    temperature: the temperature the records' log-probs were computed at (the dump's; 1 online)
    targets:     the target kind (``kdcache.target_kinds``) of the cache's settings.targets; Topk online
    """

    gram: torch.Tensor | None
    lm_head: torch.Tensor | None
    temperature: float
    targets: Topk


def packed_field(targets: dict, field: str) -> list[torch.Tensor]:
    """One field of a packed batch (``pack_records``) split back per sample (views, no copy)."""
    return list(torch.split(targets[field], targets["lengths"][:, targets["fields"].index(field)].tolist()))


def batch_losses(student, batch: dict, targets: dict | None, side: TeacherSide | None, cfg: TrainConfig):
    """All loss terms of one micro-batch -> dict of scalar tensors (``total`` included).

    ``targets``: the batch's teacher records packed (``pack_records``: one tensor per field, rows of
    the samples concatenated, ``lengths`` [B, F]) on the student's device, or None (no KD). The
    losses take the fields straight from it: no per-record views, no second concatenation."""
    lc = cfg.loss
    device = student.device
    ids = batch["input_ids"].to(device, non_blocking=True)  # pinned by the loader on CUDA
    pixels = batch["pixel_values"]
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=student.dtype, non_blocking=True)
    out = student.model(input_ids=ids, attention_mask=batch["attention_mask"].to(device, non_blocking=True),
                        pixel_values=pixels, use_cache=False)
    hidden = out.last_hidden_state  # [B, T, D] final-normed: the LM head's input
    B, T, D = hidden.shape
    W = student.lm_head.weight  # [V, D]

    # Rows of `hidden` that need the LM head: CE targets (t+1 is a response token) and KD positions.
    labels = batch["labels"].to(device, non_blocking=True)
    next_labels = torch.full_like(labels, IGNORE_INDEX)
    next_labels[:, :-1] = labels[:, 1:]  # the output at t predicts token t+1
    want = next_labels != IGNORE_INDEX  # [B, T]
    kd_row = torch.full((B, T), -1, dtype=torch.long, device=device)
    kd_kind = torch.full((B, T), -1, dtype=torch.long, device=device)
    if targets is not None:
        pos = targets["positions"].to(device).long()  # [P] every sample's distilled positions, in order
        n_pos = targets["lengths"][:, targets["fields"].index("positions")].to(device)  # [B]
        owner = torch.repeat_interleave(torch.arange(len(n_pos), device=device), n_pos,
                                        output_size=len(pos))  # [P] the sample of each row (no host sync)
        kd_row[owner, pos] = torch.arange(len(pos), device=device)
        kd_kind[owner, pos] = targets["kinds"].to(device).long()
        want |= kd_row >= 0
    flat = want.nonzero(as_tuple=False)  # [N, 2]
    h = hidden[flat[:, 0], flat[:, 1]]  # [N, D]
    ce_labels = next_labels[flat[:, 0], flat[:, 1]]  # [N]
    # Every loss row's weight is known now (1 / count per term, times its alpha / beta), so the
    # fused head forms the gradients in its forward pass: its logits once per chunk.
    ce_valid = ce_labels != IGNORE_INDEX  # [N]
    ce_weight = ce_valid / ce_valid.sum().clamp(min=1)  # L_reg = masked mean of CE
    terms = {}
    if targets is not None:
        rows = kd_row[flat[:, 0], flat[:, 1]]  # [N], -1 = no KD target
        kinds = kd_kind[flat[:, 0], flat[:, 1]]
        has = rows >= 0
        safe = rows.clamp(min=0)
        kd_weight = torch.zeros(len(rows), device=device)  # [N]
        masks = {}
        for name, code, w in (("res", KIND_RESPONSE, lc.alpha_res), ("vis", KIND_VISUAL, lc.beta_vis),
                              ("prompt", KIND_PROMPT, lc.prompt_weight)):
            if w:
                masks[name] = m = has & (kinds == code)
                kd_weight += w * m / m.sum().clamp(min=1)
        loss, ce, kd = L.fused_lm_loss(h, W, ce_weight=ce_weight, kd_weight=kd_weight, labels=ce_labels,
                                       kd_mask=has, divergence=lc.divergence, temperature=lc.kd_temperature,
                                       params=_div_params(cfg), chunk_size=lc.chunk_size,
                                       **_kd_targets(targets, safe, side, cfg))
        terms["reg"] = L.masked_mean(ce, ce_valid)  # detached values, for the log
        for name, m in masks.items():
            terms[name] = L.masked_mean(kd, m)
        total = loss
        if lc.gamma_rel:
            terms["rel"] = relation_term(hidden, batch, targets, W, side.gram, cfg)
            total = total + lc.gamma_rel * terms["rel"]
    else:
        total, ce, _ = L.fused_lm_loss(h, W, ce_weight=ce_weight, labels=ce_labels, chunk_size=lc.chunk_size)
        terms["reg"] = L.masked_mean(ce, ce_valid)
    terms["total"] = total
    return terms


def _kd_targets(targets: dict, safe: torch.Tensor, side: TeacherSide, cfg: TrainConfig) -> dict:
    """The teacher-target keywords of ``fused_lm_losses`` for the loss rows (``safe`` [N]: the
    row of each loss row among the batch's distilled positions; 0 where it has none), as the
    cache's target kind builds them (``kdcache.target_kinds``: ``fused_targets``) from the packed
    batch's fields."""
    device = safe.device

    def cat(field, dtype=None):
        t = targets[field].to(device)  # [P, ...] the batch's rows of ``field``
        return (t if dtype is None else t.to(dtype))[safe]

    return side.targets.fused_targets(cat, side, cfg, device)


def _div_params(cfg: TrainConfig) -> dict:
    return L.divergence_params(cfg.loss.divergence, beta=cfg.loss.jsd_beta, alpha=cfg.loss.skl_alpha)


def relation_term(hidden, batch, targets: dict, W_s, teacher_gram, cfg: TrainConfig):
    """L_rel = mean over samples with an image of 1 - cos(vec R_s, vec R_t), R = Y Y^T.

    Y = logits (default): R = H (W^T W) H^T on both sides, no N x V matrix; Y = hidden: R = H H^T.
    A ``relation: lowrank:R`` cache gives the teacher's side as a factor F [N, R] of its logit
    Gram instead of H: R_t = F F^T (logits only; ``check_cache_against_student`` refuses hidden).
    """
    device = hidden.device
    roles = batch["roles"].to(device, non_blocking=True)
    factored = "visual_factor" in targets["fields"]
    field = "visual_factor" if factored else "visual_hidden"
    if field not in targets["fields"]:
        return hidden.sum() * 0.0
    per_sample = packed_field(targets, field)  # [N_vis, D_t] hidden states or [N_vis, R] factor, per sample
    idx = [b for b, t in enumerate(per_sample) if t.shape[0] > 0]
    if not idx:
        return hidden.sum() * 0.0
    n = max(per_sample[b].shape[0] for b in idx)
    Hs = hidden.new_zeros(len(idx), n, hidden.shape[-1])  # [B', N, D_s]
    Ht = torch.zeros(len(idx), n, per_sample[idx[0]].shape[-1], device=device)  # [B', N, D_t or R]
    mask = torch.zeros(len(idx), n, dtype=torch.bool, device=device)
    for j, b in enumerate(idx):
        vis = (roles[b] == 1).nonzero().squeeze(1)
        m = len(vis)
        if m != per_sample[b].shape[0]:
            raise CacheMismatch(f"sample {targets['sample_id'][b]!r}: {m} visual tokens, cache has "
                                f"{per_sample[b].shape[0]} rows of {field}")
        Hs[j, :m] = hidden[b, vis]
        Ht[j, :m] = per_sample[b].to(device).float()
        mask[j, :m] = True
    if factored:
        if cfg.loss.relation_features != "logits":
            raise CacheMismatch(f"loss.relation_features {cfg.loss.relation_features!r}: the cache holds a factor "
                                "of the teacher's logit Gram only; set loss.relation_features: logits")
        Ms = lm_gram(W_s.float())  # [D_s, D_s] once per step, differentiable in W_s
        Rs = L.gram_relation(Hs.float(), Ms, mask=mask, normalize=cfg.loss.relation_normalize)
        Rt = L.gram_relation(Ht, None, mask=mask, normalize=cfg.loss.relation_normalize)  # F F^T ~ H M_t H^T
    elif cfg.loss.relation_features == "logits":
        Ms = lm_gram(W_s.float())  # [D_s, D_s] once per step, differentiable in W_s
        Rs = L.gram_relation(Hs.float(), Ms, mask=mask, normalize=cfg.loss.relation_normalize)
        Rt = L.gram_relation(Ht, teacher_gram.to(device).float(), mask=mask, normalize=cfg.loss.relation_normalize)
    else:
        Rs = L.gram_relation(Hs.float(), None, mask=mask, normalize=cfg.loss.relation_normalize)
        Rt = L.gram_relation(Ht, None, mask=mask, normalize=cfg.loss.relation_normalize)
    return L.relation_loss_from_grams(Rs, Rt).mean()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (its state file is written last), or None. Leftovers of a
    crash mid-save (``checkpoint-N.tmp`` / ``.old``, a checkpoint without its state file) are
    never taken."""
    cks = [p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
           and (p / STATE_FILE).is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


def _drop_checkpoint(ckpt: Path) -> None:
    """Remove a checkpoint, its state file first: a crash midway leaves no half checkpoint
    that ``_latest_checkpoint`` would take for a complete one."""
    (ckpt / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def save_model(model, processor, out: Path, meta: dict) -> None:
    """``save_pretrained`` (safetensors) + processor + kdcache meta, written atomically."""
    from .models import hf_bars_unless_large, model_bytes, write_meta

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with hf_bars_unless_large(model_bytes(model)):
        model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    write_meta(tmp, meta)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _save_checkpoint(ckpt: Path, model, processor, meta, optimizer, scheduler, state: dict) -> None:
    save_model(model, processor, ckpt, meta)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               ckpt / "train_state.pt")
    tmp = ckpt / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, ckpt / STATE_FILE)  # written last: a checkpoint counts once this exists


# ---------------------------------------------------------------------------------------------
# The stage


class Objective(torch.nn.Module):
    """The student and its objective as one module: ``forward`` returns the loss terms.

    Accelerate wraps this (DDP / FSDP), so the wrapper's forward runs and gradients are
    synchronised across ranks; ``batch_losses`` itself reads the student's LM head weight
    directly (no [B, T, V] logits), which a plain ``student(...)`` call could not do.
    """

    def __init__(self, student, cfg: TrainConfig):
        super().__init__()
        self.student = student
        self.cfg = cfg

    def forward(self, batch: dict, targets: dict | None, side: TeacherSide | None):
        return batch_losses(self.student, batch, targets, side, self.cfg)


def train(cfg: TrainConfig) -> Path:
    """Run one stage; returns the output directory (a plain Hugging Face LLaVA checkpoint)."""
    import datetime

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from tqdm.auto import tqdm

    from .cache.reader import CacheDataset, CacheReader
    from .dump import file_hash
    from .models import default_dtype, load_model, num_image_tokens, read_meta
    from .teacher import teacher_records

    from .cache.store import CacheLocation, cache_location

    validate(cfg)
    # a URL it cannot open is refused here, before any model loads
    cache = cache_location(cfg.cache, cfg.storage_options, what="--cache") if cfg.cache else None
    # the rate this run uses, recorded in train_config.json (a new config: the caller's is left as is)
    cfg = dataclasses.replace(cfg, lr=cfg.learning_rate)
    out = Path(cfg.out)
    if (out / "DONE").is_file():
        _check_same_run(out, cfg)
        print(f"{out} is complete (DONE); nothing to do. Use a new --out for a new run.")
        return out
    # ---- setup ----------------------------------------------------------------------------
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    trackers = _trackers()
    # Without CUDA a multi-process launch (torchrun, or `accelerate launch --multi_gpu`) must be
    # told it is on CPU, else every process believes it is alone; cpu=True gives DDP over gloo.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A rank that dies leaves its peers blocked in a collective: fail after dist_timeout_s instead.
    pg = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    acc = Accelerator(cpu=cpu_ddp, gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp,
                      log_with=trackers, project_dir=str(out), kwargs_handlers=[pg])
    set_seed(cfg.seed)
    student, processor = load_model(cfg.student, device=acc.device, flag="--student")
    tokenizer = processor.tokenizer
    n_image = num_image_tokens(student.config, processor)
    _set_trainable(student, cfg.stage)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    data = training_data(cfg, processor, student.config)
    join, source, skipped = data.join, data.source, data.skipped
    teacher = side = None
    if cfg.cache:
        reader = CacheReader(cache)
        check_cache_against_student(reader.attrs, student, tokenizer, cfg, n_image)
        dumped = reader.attrs["dataset"]
        if dumped["sha256"] != file_hash(cfg.data):
            raise CacheMismatch(f"cache {cfg.cache} was dumped from {dumped['path']} ({dumped['num_rows']} rows, "
                                     f"sha256 {dumped['sha256'][:12]}...), not from this --data {cfg.data} "
                                     f"({data.num_rows} rows, sha256 {file_hash(cfg.data)[:12]}...): pass the data "
                                     "file the cache was dumped from, or dump a cache of this one")
        if not reader.rows():
            n_skip = len(reader.skipped())
            raise CacheMismatch(f"cache {cfg.cache} holds no sample ({n_skip} rows were skipped by its dump): "
                                     "nothing to distil from. Dump it again (a new --out) with the right --images")
        missing = set(reader.rows()) - set(join.samples)
        if missing:
            raise CacheMismatch(missing_rows_message(missing, skipped, cfg, reader.attrs["settings"]))
        st = reader.attrs["settings"]
        kind = parse_targets(st["targets"])
        # on the device once: the exact mode's LM head is [V, D_t] (0.6 GB in bf16 for Qwen2.5-3B)
        side = TeacherSide(gram=torch.as_tensor(reader.gram()).to(acc.device),  # M_t = W_t^T W_t [D_t, D_t]
                           lm_head=reader.lm_head().to(acc.device) if kind.exact else None,
                           temperature=float(st["temperature"]), targets=kind)
        source = cache
        _say_temperature(reader.attrs, cfg, acc)
    if cfg.teacher:
        # The dump's dtype: the online records are the reference for the cached ones.
        t_dtype = default_dtype(acc.device)
        teacher, _ = load_model(cfg.teacher, dtype=t_dtype, device=acc.device, flag="--teacher")
        teacher.requires_grad_(False).eval()
        if teacher.lm_head.weight.shape[0] != student.lm_head.weight.shape[0]:
            raise CacheMismatch(f"teacher {cfg.teacher} and student {cfg.student} vocabularies differ "
                                f"({teacher.lm_head.weight.shape[0]} vs {student.lm_head.weight.shape[0]})")
        side = TeacherSide(gram=lm_gram(teacher.lm_head.weight.detach().float()),  # [D_t, D_t] as dumped
                           lm_head=None, temperature=1.0, targets=Topk())

    n_rank = _rank_count(source, acc)
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = max(1, math.ceil(n_rank / per_step))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999))
    scheduler = _cosine(optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    objective, optimizer = acc.prepare(Objective(student, cfg), optimizer)
    model = acc.unwrap_model(objective).student

    step, epoch, consumed, history = 0, 0, 0, []
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _latest_checkpoint(out)
    if ckpt is not None:
        step, epoch, consumed, history = _resume(ckpt, cfg, model, optimizer, scheduler, acc)
    acc.wait_for_everyone()  # every rank has read the checkpoint before rank 0 rewrites logs
    if acc.is_main_process:
        if ckpt is None:
            (out / "train_config.json").write_text(json.dumps(saved_config(cfg), indent=2))
        # Lines logged after the checkpoint belong to the lost tail of the run: drop them.
        _rewrite_jsonl(out / "metrics.jsonl", history)
    if trackers:
        acc.init_trackers(out.name, config=_flat(saved_config(cfg)))
    samples_log = out / f"samples-rank{acc.process_index}.jsonl"
    if cfg.log_samples:
        _rewrite_jsonl(samples_log, [r for r in _read_jsonl(samples_log) if r["step"] <= step])
    meta = read_meta(cfg.student)
    meta.update(projector_trained=True, stages=list(meta.get("stages", [])) + [cfg.stage],
                parent=cfg.student)

    V_student = int(model.lm_head.weight.shape[0])

    def loader(ep, start):
        kw = dict(seed=cfg.seed, epoch=ep, block_size=cfg.block_size, rank=acc.process_index,
                  world_size=acc.num_processes, start_sample=start, transform=join, batch_size=cfg.batch_size)
        ds = (CacheDataset(source, cache_dir=cfg.cache_dir, **kw) if isinstance(source, CacheLocation)
              else RowDataset(source, **kw))
        return torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            collate_fn=partial(_collate, pad_token_id=tokenizer.pad_token_id, vocab_size=V_student,
                               cache=cfg.cache),
            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
            pin_memory=acc.device.type == "cuda")  # pinned: host-to-device copies run asynchronously

    # ---- loop ------------------------------------------------------------------------------
    kinds = kd_kinds(cfg)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.stage}", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    metrics_f = open(out / "metrics.jsonl", "a") if acc.is_main_process else None
    samples_f = open(samples_log, "a") if cfg.log_samples else None
    it = iter(loader(epoch, consumed))
    objective.train()
    tokens, grad_norm, tok_rate = 0, None, 0.0
    t_last, wait = time.perf_counter(), 0.0
    # Training wall time so far (loop only, a resumed run continues its clock): loss-vs-time plots.
    wall0, t_loop = (history[-1].get("wall_s", 0.0) if history else 0.0), time.perf_counter()
    while step < total_steps:
        # Loss terms and finiteness stay on the device until the step's end: one host sync per
        # step instead of one per term and micro-batch, so the host runs ahead of the GPU.
        dev_sums: dict[str, torch.Tensor] = {}
        finite_flags: list[torch.Tensor] = []  # [] per micro-batch
        micro_ids: list[list[str]] = []
        step_ids: list[str] = []
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:  # end of this rank's epoch
                epoch, consumed = epoch + 1, 0
                it = iter(loader(epoch, 0))
                batch = next(it)
            wait += time.perf_counter() - t0
            consumed += len(batch["sample_ids"])
            step_ids += batch["sample_ids"]
            tokens += int(batch["attention_mask"].sum())
            targets = None  # the batch's teacher records, packed (pack_records), on the device
            if cfg.cache:
                # ids outside [0, V) and non-finite values were refused in the loader, on the CPU,
                # before any gather sees them: a non-finite loss after this point is the student's
                if batch["records"]["refused"]:
                    raise CacheRecordError(batch["records"]["refused"])
                targets = to_device(batch["records"], acc.device)
            if teacher is not None:
                targets = pack_records(teacher_records(teacher, batch, kinds=kinds, top_k=_online_k(cfg, teacher),
                                                       with_hidden=cfg.loss.gamma_rel > 0))
            with acc.accumulate(objective), acc.autocast():
                terms = objective(batch, targets, side)
                loss = terms["total"]
                ok = torch.isfinite(loss)
                # a non-finite loss still runs backward (as 0): keeps DDP's collectives in step
                loss = torch.where(ok, loss, loss.nan_to_num(0.0) * 0.0)
                acc.backward(loss)
            finite_flags.append(ok)
            micro_ids.append(list(batch["sample_ids"]))
            for k_, v in terms.items():
                dev_sums[k_] = dev_sums.get(k_, 0.0) + v.detach().float() / cfg.grad_accum
        keys = list(dev_sums)
        host = torch.cat([torch.stack([dev_sums[k_] for k_ in keys]), torch.stack(finite_flags).float()]).tolist()
        sums = dict(zip(keys, host[:len(keys)]))
        bad_ids = [i for ids_, f in zip(micro_ids, host[len(keys):]) if not f for i in ids_]
        # One rank's non-finite loss skips (or stops) the step on every rank.
        finite = torch.tensor([0.0 if bad_ids else 1.0], device=acc.device)
        finite = acc.reduce(finite, reduction="sum") if acc.num_processes > 1 else finite
        skipped_step = float(finite) < acc.num_processes
        lr_now = scheduler.get_last_lr()[0]  # the rate this step uses (or would have used)
        if skipped_step:
            optimizer.zero_grad(set_to_none=True)
            msg = (f"non-finite loss at step {step + 1} (rank {acc.process_index}: samples "
                   f"{bad_ids or 'all finite here'}; terms " + ", ".join(f"{k_}={v:.4g}" for k_, v in sums.items()) + ")")
            if cfg.on_nan == "stop":
                raise FloatingPointError(msg + ". on_nan=stop: training stopped; the last checkpoint is intact. "
                                         "Cached targets were checked finite, so look at the student on these samples (weights, learning "
                                         "rate, precision), or set on_nan: skip.")
            acc.print(msg + " -- step skipped (on_nan=skip)")
        else:
            if cfg.max_grad_norm:
                grad_norm = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        if samples_f:
            samples_f.write(json.dumps({"step": step, "epoch": epoch, "ids": step_ids}) + "\n")
            samples_f.flush()
        if step % cfg.log_every == 0 or step in (1, total_steps) or skipped_step:  # step 1: curves start at the start
            dt = time.perf_counter() - t_last
            if acc.num_processes > 1:  # the logged losses are the mean over ranks
                keys = sorted(sums)
                red = acc.reduce(torch.tensor([sums[k_] for k_ in keys], device=acc.device), reduction="mean")
                sums = dict(zip(keys, red.tolist()))
            rec = {"step": step, "epoch": epoch, "lr": lr_now,
                   **{f"loss/{k_}": v for k_, v in sums.items()}, "grad_norm": grad_norm,
                   "skipped": skipped_step, "tokens_per_s": tokens / max(dt, 1e-9),
                   "data_wait": wait / max(dt, 1e-9), "wall_s": wall0 + time.perf_counter() - t_loop}
            history.append(rec)
            if metrics_f:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            if trackers:
                acc.log({k_: v for k_, v in rec.items() if isinstance(v, float)}, step=step)
            tok_rate = rec["tokens_per_s"]
            tokens, wait, t_last = 0, 0.0, time.perf_counter()
        # the rate since the last log line (right after one: that line's), never a 0 before the first
        live = tokens / max(time.perf_counter() - t_last, 1e-9) if tokens else tok_rate
        bar.set_postfix({**{k_: f"{v:.3f}" for k_, v in sums.items()}, "tok/s": f"{live:.0f}"}, refresh=False)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                _save_checkpoint(out / f"checkpoint-{step}", model, processor, meta, optimizer, scheduler,
                                 {"step": step, "epoch": epoch, "consumed": consumed, "history": history})
                for old in out.glob("checkpoint-*"):
                    if old.name != f"checkpoint-{step}":
                        _drop_checkpoint(old)
    bar.close()
    if samples_f:
        samples_f.close()
    # ---- save ------------------------------------------------------------------------------
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(model, processor, out / "model.tmpdir", meta)
        for f in (out / "model.tmpdir").iterdir():
            os.replace(f, out / f.name)
        shutil.rmtree(out / "model.tmpdir", ignore_errors=True)
        (out / "skipped.json").write_text(json.dumps(skipped.as_dict(), indent=2))
        for old in out.glob("checkpoint-*"):
            _drop_checkpoint(old)
        (out / "DONE").write_text(json.dumps({"steps": step, "history": history[-1:]}))  # written last
        metrics_f.close()
        acc.print(f"saved {out} after {step} steps ({skipped.summary()})")
    acc.wait_for_everyone()
    # Drop the DDP wrapper (its reducer holds the process group and gloo work objects) while the
    # interpreter is alive, then destroy the group: work objects left to interpreter shutdown can
    # abort the process (SIGABRT, "terminate called without an active exception"), seen ~1 in 10
    # two-rank CPU runs after a complete, saved training.
    objective, optimizer = acc.free_memory(objective, optimizer)
    acc.end_training()
    return out


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines log; a last line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def _rewrite_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
    return out


def _trackers():
    try:
        import tensorboard  # noqa: F401
        return "tensorboard"
    except ImportError:
        return None


def _online_k(cfg: TrainConfig, teacher) -> int:
    return teacher.lm_head.weight.shape[0]  # online KD is the full-distribution reference


def _say_temperature(attrs: dict, cfg: TrainConfig, acc) -> None:
    st = attrs["settings"]
    acc.print(parse_targets(st["targets"]).temperature_note(float(st["temperature"]), cfg.loss.kd_temperature))


def _rank_count(source, acc) -> int:
    from .cache.reader import CacheReader
    from .cache.store import CacheLocation

    n = CacheReader(source).num_samples if isinstance(source, CacheLocation) else len(source)
    return math.ceil(max(n - acc.process_index, 0) / acc.num_processes)


def _set_trainable(model, stage: str) -> None:
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage in ("sft", "dft"):
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    model.model.vision_tower.requires_grad_(False)


def _cosine(optimizer, total: int, warmup_ratio: float, min_ratio: float):
    warm = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(s):
        if s < warm:
            return (s + 1) / warm
        p = (s - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


# TrainConfig keys that name files or directories: a rerun may spell them otherwise
# (./data/x.json for data/x.json, an absolute path); the data file may also have moved, same bytes.
PATH_KEYS = ("student", "data", "images", "out", "cache", "teacher")


def _same_place(key: str, a, b) -> bool:
    """Do two values of a PATH_KEYS key name the same input? Resolved paths, or for ``data`` the
    same bytes (sha256); URLs (``s3://...``) and hub ids compare as written."""
    if a == b or a is None or b is None:
        return a == b
    if "://" in a or "://" in b:
        return False
    from .dump import file_hash

    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    return key == "data" and pa.is_file() and pb.is_file() and file_hash(pa) == file_hash(pb)


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    """A rerun into ``out`` must be the same command (resume), not another run; paths compare by
    what they name (``_same_place``), not by their spelling."""
    f = out / "train_config.json"
    if not f.is_file():
        return
    saved, now = json.loads(f.read_text()), json.loads(json.dumps(saved_config(cfg)))
    if saved.get("lr") is None:  # written before the resolved rate was recorded: the stage's default
        saved["lr"] = STAGE_LR[saved["stage"]]
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
            and not (k in PATH_KEYS and _same_place(k, saved.get(k), now.get(k)))]
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in diff)
        raise RunMismatchError(f"{out} holds a run made with other settings ({shown}): a rerun resumes only the "
                               "same command; pass those settings, or use a new --out for a new run")


def saved_config(cfg: TrainConfig) -> dict:
    """The run's config as written to train_config.json and trackers: everything but
    ``storage_options`` (how to reach the cache, not what the run is; they may hold credentials)
    and ``cache_dir``."""
    d = to_dict(cfg)
    d.pop("storage_options")
    d.pop("cache_dir")  # a local copy of the cache: where, not what (a resume may use another)
    return d


def _resume(ckpt: Path, cfg: TrainConfig, model, optimizer, scheduler, acc):
    """Load weights, optimizer, scheduler and RNG from ``ckpt``; -> (step, epoch, consumed, history).

    Only safetensors and ``torch.load(weights_only=True)``: a checkpoint never runs code.
    """
    from transformers import LlavaForConditionalGeneration

    _check_same_run(Path(cfg.out), cfg)
    # Through from_pretrained: the file's key names are transformers' serialised ones, which
    # need not be the in-memory names (transformers 5 renames LLaVA's on save and load).
    saved = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=model.dtype)
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved
    st = torch.load(ckpt / "train_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng_cpu"])
    if torch.cuda.is_available() and st["rng_cuda"]:
        torch.cuda.set_rng_state_all(st["rng_cuda"])
    state = json.loads((ckpt / STATE_FILE).read_text())
    acc.print(f"resuming from {ckpt}: step {state['step']}, epoch {state['epoch']}, "
              f"{state['consumed']} samples into the epoch")
    return state["step"], state["epoch"], state["consumed"], state["history"]
