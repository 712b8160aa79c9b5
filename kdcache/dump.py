"""Dump a teacher's targets into a Zarr cache: phase one of kdcache, top-down in this file.

    kdcache dump --teacher runs/teacher-sft --data data/instruct.json --images data \\
        --out caches/teacher-instruct.zarr --top-k 64 --positions visual,response

    torchrun --nproc-per-node 8 -m kdcache.cli dump ...      # one process per GPU
    accelerate launch -m kdcache.cli dump ...                # the same through accelerate

One teacher-forced pass per sample (``kdcache.teacher.teacher_records``) -> top-k log-probs +
tail at the chosen position kinds, visual hidden states, and the LM-head Gram W^T W once.
Samples are split by rank (row % world_size == rank); each rank writes its own part and
the cache opens as one. Killing the job at any moment and running the same command again
finishes the cache: committed samples are kept, the rest is redone; a finished cache is
left alone; other settings into an existing cache are refused.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from .config import DumpConfig, validate


class DumpError(RuntimeError):
    """A dump cannot start or go on; the message says why and what to do."""


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / accelerate launch, else (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprints(cfg: DumpConfig, model, processor, n_image: int, num_rows: int, world_size: int):
    """Teacher / tokenizer / dataset / settings dicts for the cache's group attributes."""
    from .models import config_hash, text_hash, tokenizer_hash

    tok = processor.tokenizer
    teacher = {"name_or_path": str(cfg.teacher), "config_hash": config_hash(model.config),
               "vocab_size": int(model.lm_head.weight.shape[0]),
               "hidden_size": int(model.lm_head.weight.shape[1]), "dtype": str(model.dtype).replace("torch.", ""),
               "num_image_tokens": int(n_image)}
    tokenizer = {"name_or_path": str(cfg.teacher), "vocab_hash": tokenizer_hash(tok), "template": cfg.template,
                 "template_hash": text_hash(tok.chat_template if cfg.template == "chat" else cfg.template)}
    dataset = {"path": str(cfg.data), "num_rows": int(num_rows), "sha256": file_hash(cfg.data)}
    settings = {"top_k": int(cfg.top_k), "positions": list(cfg.positions), "logprob_dtype": cfg.logprob_dtype,
                "hidden": cfg.hidden, "temperature": float(cfg.temperature),
                "relation": "none" if cfg.hidden == "none" else "hidden", "max_length": int(cfg.max_length),
                "world_size": int(world_size), "targets": "topk"}
    return teacher, tokenizer, dataset, settings


def check_output(out: Path) -> None:
    """Fail before any teacher work if the output cannot be written."""
    parent = out if out.exists() else out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DumpError(f"cannot create the output directory {parent} ({e.strerror}): choose another --out") from e
    if not os.access(parent, os.W_OK):
        raise DumpError(f"output {parent} is not writable: choose another --out")


def dump(cfg: DumpConfig) -> Path:
    """Write (or finish) the cache ``cfg.out``; returns its path."""
    from tqdm.auto import tqdm

    from .cache.format import make_attrs
    from .cache.writer import CacheWriter
    from .data.collate import LlavaTorchDataset, collate, prepare_samples
    from .data.llava import read_llava_json
    from .models import image_token_id, load_model, model_dir, num_image_tokens, projector_trained
    from .teacher import teacher_records

    validate(cfg)
    out = Path(cfg.out)
    check_output(out)
    # ---- setup ----------------------------------------------------------------------------
    rank, world, local_rank = dist_env()
    device = pick_device(cfg.device, local_rank)
    path = model_dir(cfg.teacher)
    if not projector_trained(path):
        raise DumpError(
            f"teacher {cfg.teacher} has a projector no stage has trained (it came from `kdcache init-model`). "
            f"Train it first: `kdcache train --stage pt --student {cfg.teacher} --data CAPTIONS.json "
            f"--images DIR --out runs/teacher-pt`, then SFT, and dump from that directory."
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = load_model(path, dtype=dtype, device=device)
    model.requires_grad_(False).eval()
    n_image = num_image_tokens(model.config, processor)
    tok = processor.tokenizer
    samples = read_llava_json(cfg.data)
    mine = [s for s in samples if s.row % world == rank]
    attrs = make_attrs(*fingerprints(cfg, model, processor, n_image, len(samples), world))
    writer = CacheWriter(out, attrs, rank=rank, world_size=world)
    if writer.is_finished():
        print(f"[rank {rank}] {out}: part {rank} is already complete ({len(writer.committed_rows())} samples); "
              "nothing to do")
        return out
    if rank == 0:
        W = model.lm_head.weight.detach().float()
        writer.write_gram((W.T @ W).cpu().numpy())  # M_t = W^T W [D, D]: relation targets in logit space
    done = set(writer.committed_rows())
    kept, toks, skipped = prepare_samples(
        [s for s in mine if s.row not in done], tok, images_root=cfg.images, template=cfg.template,
        image_token_id=image_token_id(model.config), num_image_tokens=n_image, max_length=cfg.max_length,
        on_too_long=cfg.on_too_long)
    ds = LlavaTorchDataset.from_prepared(kept, toks, processor.image_processor, cfg.images)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                         collate_fn=lambda items: collate(items, tok.pad_token_id),
                                         prefetch_factor=4 if cfg.num_workers else None)
    # Skips are committed in row order with the data so that a resumed run ends identical.
    skip_at = {row: (row, sid, why) for row, sid, why in skipped.items}
    order = sorted([s.row for s in kept] + list(skip_at))
    # ---- loop ------------------------------------------------------------------------------
    bar = tqdm(total=len(mine), initial=len(done), desc=f"dump rank {rank}", unit="sample", dynamic_ncols=True)
    t0, n_tok, n_pos = time.perf_counter(), 0, 0
    cursor = 0
    for batch in loader:
        recs = teacher_records(model, batch, kinds=cfg.positions, top_k=cfg.top_k, temperature=cfg.temperature,
                               with_hidden=cfg.hidden != "none", chunk_size=cfg.chunk_size)
        for r in recs:
            while order[cursor] != r.row:  # skipped rows that come before this one
                writer.skip(*skip_at[order[cursor]])
                cursor += 1
            writer.add(r)
            cursor += 1
            n_tok += r.num_tokens
            n_pos += len(r.positions)
        bar.update(len(recs))
        dt = time.perf_counter() - t0
        bar.set_postfix({"tok/s": f"{n_tok / dt:.0f}", "pos/s": f"{n_pos / dt:.0f}"}, refresh=False)
    for row in order[cursor:]:
        writer.skip(*skip_at[row])
    bar.update(len(skip_at))
    # ---- save ------------------------------------------------------------------------------
    writer.close(finished=True)
    bar.close()
    dt = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[rank {rank}] dumped {len(kept)} samples, {n_tok} tokens, {n_pos} positions in {dt:.1f}s "
          f"({n_tok / max(dt, 1e-9):.0f} tok/s); cache {out} is {nbytes / 2**20:.1f} MiB; {skipped.summary()}")
    return out
