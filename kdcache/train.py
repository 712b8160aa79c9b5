"""Train a student: one stage of PT -> DPT -> SFT -> DFT (LLaVA-KD), top-down in this file.

    kdcache train --stage dft --student runs/student-sft --data data/instruct.json \\
        --images data --cache caches/teacher-instruct.zarr --out runs/student-dft

    accelerate launch -m kdcache.cli train ...   # DDP / FSDP / DeepSpeed through accelerate

Objective (design section 1), each term averaged over its positions in the batch:
    L = L_reg + alpha_res L_res + beta_vis L_vis + prompt_weight L_prompt + gamma_rel L_rel
pt/sft train on L_reg alone; dpt/dft add the distillation terms from ``--cache`` (offline, the
teacher never loaded) or ``--teacher`` (online: the teacher runs through the same record
function as the dump; the exactness reference). Trainable: the projector (pt, dpt) or the
projector + LLM (sft, dft); the vision tower is always frozen.

Setup -> loop -> save. A checkpoint (``out/checkpoint-<step>/``) holds the model as
``save_pretrained`` safetensors plus optimizer, scheduler, RNG and data position; a rerun of
the same command resumes from the newest one and continues with the same data order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from . import losses as L
from .config import TrainConfig, to_dict, validate
from .positions import KIND_PROMPT, KIND_RESPONSE, KIND_VISUAL
from .records import TeacherRecord

STATE_FILE = "trainer_state.json"


class CacheMismatchError(RuntimeError):
    """The cache was made for another tokenizer, template, vocabulary or data."""


# ---------------------------------------------------------------------------------------------
# Data: the (optional) cache drives the order; every sample is re-tokenised and checked.


class SampleJoin:
    """Worker-side transform: a cache record (or a bare row) -> a training item.

    The item comes from the student's own tokenisation (done once, up front); against a cache
    its token ids must equal the cached ones, so a cache from another tokenizer, template or
    data file never trains.
    """

    def __init__(self, dataset):
        self.dataset = dataset  # kdcache.data.collate.LlavaTorchDataset over the kept samples
        self.index = {s.row: i for i, s in enumerate(dataset.samples)}

    def __call__(self, rec):
        row = rec.row if isinstance(rec, TeacherRecord) else int(rec)
        if row not in self.index:
            raise CacheMismatchError(f"row {row} of the cache is not a usable sample of this data file "
                                     "(missing, or skipped as bad input): pass the data file the cache was dumped from")
        item = self.dataset[self.index[row]]
        if isinstance(rec, TeacherRecord):
            if rec.sample_id != item["sample_id"] or not torch.equal(rec.input_ids.long(), item["input_ids"]):
                raise CacheMismatchError(
                    f"sample {item['sample_id']!r} (row {row}): the cache's token ids differ from this "
                    f"tokenisation ({rec.num_tokens} cached vs {len(item['input_ids'])} now). The cache was "
                    "dumped with another tokenizer, template, image-token count or data file: dump it again "
                    "for this student."
                )
            item["record"] = rec
        return item


class RowDataset(torch.utils.data.IterableDataset):
    """Samples without a cache (pt/sft, online KD) in the same order a one-part cache would
    give: ``kdcache.cache.reader.rank_order`` over one part of the kept rows."""

    def __init__(self, rows, *, seed, epoch, block_size, rank, world_size, start_sample, transform, batch_size):
        super().__init__()
        self.rows, self.transform, self.batch_size = list(rows), transform, batch_size
        self.args = (seed, epoch, block_size, rank, world_size)
        self.start_sample = start_sample

    def __iter__(self):
        from .cache.reader import rank_order, worker_slice

        info = torch.utils.data.get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        seed, epoch, block, rank, world = self.args
        seq = rank_order([len(self.rows)], seed, epoch, block, rank, world)[self.start_sample:]
        for j in worker_slice(len(seq), worker, nw, self.batch_size):
            yield self.transform(self.rows[seq[j][1]])


def _collate(items, pad_token_id):
    from .data.collate import collate

    batch = collate(items, pad_token_id)
    batch["records"] = [it.get("record") for it in items]
    return batch


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
        raise CacheMismatchError(f"cache {cfg.cache} does not match student {cfg.student}: " + "; ".join(problems))


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


def batch_losses(student, batch: dict, records: list[TeacherRecord] | None, teacher_gram, cfg: TrainConfig):
    """All loss terms of one micro-batch -> dict of scalar tensors (``total`` included)."""
    lc = cfg.loss
    device = student.device
    ids = batch["input_ids"].to(device)
    pixels = batch["pixel_values"]
    if pixels is not None:
        pixels = pixels.to(device=device, dtype=student.dtype)
    out = student.model(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                        pixel_values=pixels, use_cache=False)
    hidden = out.last_hidden_state  # [B, T, D] final-normed: the LM head's input
    B, T, D = hidden.shape
    W = student.lm_head.weight  # [V, D]

    # Rows of `hidden` that need the LM head: CE targets (t+1 is a response token) and KD positions.
    labels = batch["labels"].to(device)
    next_labels = torch.full_like(labels, -100)
    next_labels[:, :-1] = labels[:, 1:]  # the output at t predicts token t+1
    want = next_labels != -100  # [B, T]
    kd_row = torch.full((B, T), -1, dtype=torch.long, device=device)
    kd_kind = torch.full((B, T), -1, dtype=torch.long, device=device)
    if records is not None:
        off = 0
        for b, r in enumerate(records):
            pos = r.positions.to(device).long()
            kd_row[b, pos] = torch.arange(off, off + len(pos), device=device)
            kd_kind[b, pos] = r.kinds.to(device).long()
            off += len(pos)
        want |= kd_row >= 0
    flat = want.nonzero(as_tuple=False)  # [N, 2]
    h = hidden[flat[:, 0], flat[:, 1]]  # [N, D]
    ce_labels = next_labels[flat[:, 0], flat[:, 1]]  # [N]
    terms = {}
    if records is not None:
        rows = kd_row[flat[:, 0], flat[:, 1]]  # [N], -1 = no KD target
        kinds = kd_kind[flat[:, 0], flat[:, 1]]
        has = rows >= 0
        k = records[0].k
        topk_ids = torch.cat([r.topk_ids for r in records]).to(device).long()  # [P, k]
        topk_lp = torch.cat([r.topk_logprobs for r in records]).to(device).float()
        tail = torch.cat([r.tail_logmass for r in records]).to(device).float()
        safe = rows.clamp(min=0)
        ce, kd = L.fused_lm_losses(
            h, W, labels=ce_labels, kd_mask=has, topk_ids=topk_ids[safe].reshape(-1, k),
            topk_logprobs=topk_lp[safe], tail_logmass=tail[safe] if lc.tail else None,
            divergence=lc.divergence, temperature=lc.kd_temperature,
            params=_div_params(cfg), chunk_size=lc.chunk_size)
        terms["reg"] = L.masked_mean(ce, ce_labels != -100)
        for name, code, w in (("res", KIND_RESPONSE, lc.alpha_res), ("vis", KIND_VISUAL, lc.beta_vis),
                              ("prompt", KIND_PROMPT, lc.prompt_weight)):
            if w:
                terms[name] = L.masked_mean(kd, has & (kinds == code))
        if lc.gamma_rel:
            terms["rel"] = relation_term(hidden, batch, records, W, teacher_gram, cfg)
    else:
        ce, _ = L.fused_lm_losses(h, W, labels=ce_labels, chunk_size=lc.chunk_size)
        terms["reg"] = L.masked_mean(ce, ce_labels != -100)
    total = terms["reg"]
    weights = {"res": lc.alpha_res, "vis": lc.beta_vis, "prompt": lc.prompt_weight, "rel": lc.gamma_rel}
    for name, w in weights.items():
        if name in terms:
            total = total + w * terms[name]
    terms["total"] = total
    return terms


def _div_params(cfg: TrainConfig) -> dict:
    d = cfg.loss.divergence
    return {"beta": cfg.loss.jsd_beta} if d == "jsd" else {"alpha": cfg.loss.skl_alpha} if d == "skl" else {}


def relation_term(hidden, batch, records, W_s, teacher_gram, cfg: TrainConfig):
    """L_rel = mean over samples with an image of 1 - cos(vec R_s, vec R_t), R = Y Y^T.

    Y = logits (default): R = H (W^T W) H^T on both sides, no N x V matrix; Y = hidden: R = H H^T.
    """
    device = hidden.device
    roles = batch["roles"].to(device)
    idx = [b for b, r in enumerate(records) if r.visual_hidden is not None and r.visual_hidden.shape[0] > 0]
    if not idx:
        return hidden.sum() * 0.0
    n = max(records[b].visual_hidden.shape[0] for b in idx)
    Hs = hidden.new_zeros(len(idx), n, hidden.shape[-1])  # [B', N, D_s]
    Ht = torch.zeros(len(idx), n, records[idx[0]].visual_hidden.shape[-1], device=device)
    mask = torch.zeros(len(idx), n, dtype=torch.bool, device=device)
    for j, b in enumerate(idx):
        vis = (roles[b] == 1).nonzero().squeeze(1)
        m = len(vis)
        if m != records[b].visual_hidden.shape[0]:
            raise CacheMismatchError(f"sample {records[b].sample_id!r}: {m} visual tokens, cache has "
                                     f"{records[b].visual_hidden.shape[0]}")
        Hs[j, :m] = hidden[b, vis]
        Ht[j, :m] = records[b].visual_hidden.to(device).float()
        mask[j, :m] = True
    if cfg.loss.relation_features == "logits":
        Ms = W_s.float().T @ W_s.float()  # [D_s, D_s] once per step, differentiable in W_s
        Rs = L.gram_relation(Hs.float(), Ms, mask=mask, normalize=cfg.loss.relation_normalize)
        Rt = L.gram_relation(Ht, teacher_gram.to(device).float(), mask=mask, normalize=cfg.loss.relation_normalize)
    else:
        Rs = L.gram_relation(Hs.float(), None, mask=mask, normalize=cfg.loss.relation_normalize)
        Rt = L.gram_relation(Ht, None, mask=mask, normalize=cfg.loss.relation_normalize)
    return L.relation_loss_from_grams(Rs, Rt).mean()


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _latest_checkpoint(out: Path) -> Path | None:
    cks = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    cks = [c for c in cks if (c / STATE_FILE).is_file()]
    return cks[-1] if cks else None


def save_model(model, processor, out: Path, meta: dict) -> None:
    """``save_pretrained`` (safetensors) + processor + kdcache meta, written atomically."""
    from .models import write_meta

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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


def train(cfg: TrainConfig) -> Path:
    """Run one stage; returns the output directory (a plain Hugging Face LLaVA checkpoint)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .cache.reader import CacheDataset, CacheReader
    from .data.llava import read_llava_json
    from .data.collate import LlavaTorchDataset, prepare_samples
    from .models import image_token_id, load_model, num_image_tokens, projector_trained, read_meta
    from .teacher import teacher_records

    validate(cfg)
    out = Path(cfg.out)
    # ---- setup ----------------------------------------------------------------------------
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp,
                      log_with=_trackers(), project_dir=str(out))
    set_seed(cfg.seed)
    student, processor = load_model(cfg.student, device=acc.device)
    tokenizer = processor.tokenizer
    n_image = num_image_tokens(student.config, processor)
    _set_trainable(student, cfg.stage)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    samples = read_llava_json(cfg.data)
    kept, toks, skipped = prepare_samples(samples, tokenizer, images_root=cfg.images, template=cfg.template,
                                          image_token_id=image_token_id(student.config), num_image_tokens=n_image,
                                          max_length=cfg.max_length, on_too_long=cfg.on_too_long)
    join = SampleJoin(LlavaTorchDataset.from_prepared(kept, toks, processor.image_processor, cfg.images))
    teacher = teacher_gram = None
    if cfg.cache:
        reader = CacheReader(cfg.cache)
        check_cache_against_student(reader.attrs, student, tokenizer, cfg, n_image)
        missing = set(reader.rows()) - {s.row for s in kept}
        if missing:
            raise CacheMismatchError(f"the cache holds rows the data file {cfg.data} does not: "
                                     f"{sorted(missing)[:5]}... Pass the data file the cache was dumped from.")
        teacher_gram = torch.as_tensor(reader.gram())  # M_t = W_t^T W_t [D_t, D_t]
        source = cfg.cache
        _say_temperature(reader.attrs, cfg, acc)
    else:
        source = [s.row for s in kept]
    if cfg.teacher:
        teacher, _ = load_model(cfg.teacher, device=acc.device)
        teacher.requires_grad_(False).eval()
        if teacher.lm_head.weight.shape[0] != student.lm_head.weight.shape[0]:
            raise CacheMismatchError("teacher and student vocabularies differ")
        W_t = teacher.lm_head.weight.detach().float()
        teacher_gram = W_t.T @ W_t  # [D_t, D_t]

    n_rank = _rank_count(source, acc)
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = max(1, math.ceil(n_rank / per_step))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999))
    scheduler = _cosine(optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    student, optimizer = acc.prepare(student, optimizer)
    model = acc.unwrap_model(student)

    step, epoch, consumed, history = 0, 0, 0, []
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _latest_checkpoint(out)
    if ckpt is not None:
        step, epoch, consumed, history = _resume(ckpt, cfg, model, optimizer, scheduler, acc)
    elif acc.is_main_process:
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    meta = read_meta(cfg.student)
    meta.update(projector_trained=True, stages=list(meta.get("stages", [])) + [cfg.stage],
                parent=cfg.student)

    def loader(ep, start):
        kw = dict(seed=cfg.seed, epoch=ep, block_size=cfg.block_size, rank=acc.process_index,
                  world_size=acc.num_processes, start_sample=start, transform=join, batch_size=cfg.batch_size)
        ds = CacheDataset(source, **kw) if isinstance(source, str) else RowDataset(source, **kw)
        return torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            collate_fn=lambda items: _collate(items, tokenizer.pad_token_id),
            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)

    # ---- loop ------------------------------------------------------------------------------
    kinds = kd_kinds(cfg)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.stage}", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    metrics_f = open(out / "metrics.jsonl", "a") if acc.is_main_process else None
    it = iter(loader(epoch, consumed))
    student.train()
    tokens = 0
    t_last, wait = time.perf_counter(), 0.0
    while step < total_steps:
        sums: dict[str, float] = {}
        bad_ids: list[str] = []
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                epoch, consumed = epoch + 1, 0
                it = iter(loader(epoch, 0))
                batch = next(it)
            wait += time.perf_counter() - t0
            consumed += len(batch["sample_ids"])
            tokens += int(batch["attention_mask"].sum())
            records = batch["records"] if cfg.cache else None
            if teacher is not None:
                records = teacher_records(teacher, batch, kinds=kinds, top_k=_online_k(cfg, teacher),
                                          with_hidden=cfg.loss.gamma_rel > 0)
            with acc.accumulate(student), acc.autocast():
                terms = batch_losses(model, batch, records, teacher_gram, cfg)
                loss = terms["total"]
                if not torch.isfinite(loss):
                    bad_ids += list(batch["sample_ids"])
                    loss = loss.nan_to_num(0.0) * 0.0  # keeps DDP's collective in step
                acc.backward(loss)
            for k_, v in terms.items():
                sums[k_] = sums.get(k_, 0.0) + float(v.detach()) / cfg.grad_accum
        finite = torch.tensor([0.0 if bad_ids else 1.0], device=acc.device)
        finite = acc.reduce(finite, reduction="min") if acc.num_processes > 1 else finite
        if float(finite) < 1:
            optimizer.zero_grad(set_to_none=True)
            msg = f"non-finite loss at step {step + 1}; samples {bad_ids}"
            if cfg.on_nan == "stop":
                raise FloatingPointError(msg + " (on_nan=stop; the last checkpoint is intact)")
            acc.print(msg + " -- step skipped (on_nan=skip)")
        else:
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            dt = time.perf_counter() - t_last
            rec = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                   **{f"loss/{k_}": v for k_, v in sums.items()},
                   "tokens_per_s": tokens / max(dt, 1e-9), "data_wait": wait / max(dt, 1e-9)}
            history.append(rec)
            if metrics_f:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            acc.log({k_: v for k_, v in rec.items() if k_ != "step"}, step=step)
            tokens, wait, t_last = 0, 0.0, time.perf_counter()
        bar.set_postfix({k_: f"{v:.3f}" for k_, v in sums.items()}, refresh=False)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                _save_checkpoint(out / f"checkpoint-{step}", model, processor, meta, optimizer, scheduler,
                                 {"step": step, "epoch": epoch, "consumed": consumed, "history": history})
                for old in out.glob("checkpoint-*"):
                    if old.name != f"checkpoint-{step}":
                        shutil.rmtree(old, ignore_errors=True)
    bar.close()
    # ---- save ------------------------------------------------------------------------------
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_model(model, processor, out / "model.tmpdir", meta)
        for f in (out / "model.tmpdir").iterdir():
            os.replace(f, out / f.name)
        shutil.rmtree(out / "model.tmpdir", ignore_errors=True)
        (out / "skipped.json").write_text(json.dumps(skipped.as_dict(), indent=2))
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        (out / "DONE").write_text(json.dumps({"steps": step, "history": history[-1:] }))
        metrics_f.close()
        acc.print(f"saved {out} after {step} steps ({skipped.summary()})")
    acc.end_training()
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
    t_dump = float(attrs["settings"]["temperature"])
    t_kd = cfg.loss.kd_temperature
    if t_kd == t_dump:
        acc.print(f"KD temperature {t_kd} = the dump's: exact on the top-k ids and the tail")
    else:
        acc.print(f"KD temperature {t_kd} != the dump's {t_dump}: exact on the top-k ids relative to each "
                  "other, approximate on the tail bucket (its inner shape is not cached)")


def _rank_count(source, acc) -> int:
    from .cache.reader import CacheReader

    n = CacheReader(source).num_samples if isinstance(source, str) else len(source)
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


def _resume(ckpt: Path, cfg: TrainConfig, model, optimizer, scheduler, acc):
    saved = json.loads((cfg_path := Path(cfg.out) / "train_config.json").read_text()) if (
        Path(cfg.out) / "train_config.json").is_file() else None
    if saved is not None and saved != json.loads(json.dumps(to_dict(cfg))):
        diff = [k for k in saved if saved[k] != json.loads(json.dumps(to_dict(cfg)))[k]]
        raise RuntimeError(f"{cfg_path} was written with other settings ({', '.join(diff)}): resume needs "
                           "the same command; use a new --out for a new run")
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {ckpt} has unexpected weights {unexpected[:3]}")
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
