"""Dump a teacher's targets into a Zarr cache: phase one of kdcache, top-down in this file.

    kdcache dump --teacher runs/teacher-sft --data data/instruct.json --images data \\
        --out caches/teacher-instruct.zarr --top-k 64 --positions visual,response

    torchrun --nproc-per-node 8 -m kdcache.cli dump ...      # one process per GPU
    accelerate launch -m kdcache.cli dump ...                # the same through accelerate

One teacher-forced pass per sample (``kdcache.teacher.teacher_records``) -> top-k log-probs +
tail at the chosen position kinds, visual hidden states, and the LM-head Gram W^T W once.
``--targets hidden`` adds the hidden state at every position and the LM head W once (exact);
``--targets sampled:N`` stores N draws per position instead of the top-k, seeded by
(``--draw-seed``, row) so a rerun, another batch size or rank count draws the same ids
(kdcache/cache/README.md, "Target modes").
Samples are split by rank (row % world_size == rank); each rank writes its own part and
the cache opens as one. With WORLD_SIZE > 1 the ranks join a torch.distributed group (gloo on
CPU, nccl on CUDA) only to add up the totals and to let rank 0 report once every part is done.

Killing the job at any moment and running the same command again finishes the cache: committed
samples are kept, the rest is redone, and the result is identical to an uninterrupted run
(samples are committed in row order, skipped rows included). A finished cache is left alone;
other settings into an existing cache are refused, naming the setting, before the teacher is
loaded and without touching the cache.

Commits: the writer commits whenever a shard's worth is buffered; on top of that the dump commits
after the batch that ends ``commit_every_s`` seconds (DumpConfig) after the last commit (0 =
after every batch), which bounds the work a crash can lose on small shards.

Backends (``DumpConfig.backend``, ``kdcache dump --backend``, a recipe's ``backend:``): ``hf``
(default, the reference: ``kdcache.teacher.teacher_records``) or ``vllm``
(``kdcache.backends.vllm``, ``pip install 'kdcache[vllm]'``, engine settings ``DumpConfig.vllm``):
the same top-k log-probs from vLLM's prompt log-probs, with the tail from the head (no logits);
the settings attribute records ``backend`` (who made the log-probs). vLLM gives no hidden states:
with ``hidden: none`` the HF model is loaded once, on the CPU in the vLLM dtype, for the
fingerprints and W^T W, and freed before vLLM starts; otherwise (hybrid) it stays on the GPU and
computes the visual hidden states on each sample's prefix up to the image's end
(``kdcache.teacher.visual_hidden_states``), merged into vLLM's records (``kdcache.backends.vllm_dump``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache.store import CacheLocation
from .config import DumpConfig, validate
from .relation import lm_gram



class DumpError(RuntimeError):
    """A dump cannot start or go on; the message says why and what to do."""


# "no space" errors: a full filesystem, a file-size limit (RLIMIT_FSIZE, EFBIG), a quota
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_full_error(out: CacheLocation, rank: int, e: OSError) -> DumpError:
    """The one-line DumpError for a write that failed for lack of space; the samples committed
    before it are intact (every file is written to ``*.partial`` and renamed)."""
    from .cache.format import read_json_attrs
    from .cache.writer import sweep_partials

    if out.is_local:
        sweep_partials(out.local / "parts" / str(rank))  # give back the space of the torn temp files
    try:
        done = int((read_json_attrs(out, f"parts/{rank}") or {})["committed"]["samples"])
    except Exception:  # the part was not created yet
        done = 0
    return DumpError(
        f"cache {out}: disk full ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}) writing "
        f"{e.filename or 'a chunk'} on rank {rank}; the {done} samples committed so far are kept. Free space "
        "(or raise the file-size limit / quota) and run the same command again to resume")


def store_failure(out: CacheLocation, rank: int, e: BaseException) -> DumpError:
    """The one-line DumpError for a URL cache whose store stopped answering (after the client's
    retries with backoff); what was committed before is intact (every object is one atomic PUT)."""
    from .cache.format import read_json_attrs

    try:
        done = f"the {int(read_json_attrs(out, f'parts/{rank}')['committed']['samples'])} samples"
    except Exception:  # the store is still down, or the part was not created yet
        done = "the samples"
    return DumpError(f"cache {out}: the store failed on rank {rank} ({type(e).__name__}: {e}); {done} committed so "
                     "far are kept. Check the network, the endpoint (AWS_ENDPOINT_URL or --storage-option "
                     "endpoint_url=...) and the credentials, then run the same command again to resume")


# ---- environment -----------------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / accelerate launch, else (0, 1, 0)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is there, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def init_distributed(world: int, device: torch.device, timeout_s: float) -> bool:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); True if this call did.

    ``timeout_s`` (``DumpConfig.dist_timeout_s``) bounds every collective: a rank whose peer died
    fails with a timeout error after that long instead of waiting forever (its committed samples
    are kept; the rerun resumes)."""
    import datetime

    import torch.distributed as tdist

    if world <= 1 or tdist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                             timeout=datetime.timedelta(seconds=timeout_s))
    return True


# ---- fingerprints ----------------------------------------------------------------------------
def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (the dataset fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def weights_hash(model, n: int = 256) -> str:
    """Cheap fingerprint of the weights: sha256 over every parameter's name, shape, dtype and its
    first and last ``n`` values. Training changes every trainable tensor, so a teacher retrained
    into the same directory no longer matches a cache it started."""
    names, pieces = [], []
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        names.append(f"{name}:{tuple(p.shape)}:{p.dtype}")
        pieces += [flat[:n], flat[-n:]]
    vals = torch.cat([x.float() for x in pieces]).cpu().numpy()  # one device->host copy
    h = hashlib.sha256("\n".join(names).encode())
    h.update(vals.tobytes())
    return h.hexdigest()[:16]


def dump_settings(cfg: DumpConfig, world_size: int) -> dict:
    """The cache's ``settings`` attribute: everything in ``cfg`` that changes what is stored.

    ``targets: sampled:N`` stores N columns, so ``top_k`` is N (``cfg.top_k`` is not used) and
    ``draw_seed`` is recorded; the other modes have no ``draw_seed``. ``relation`` is
    the relation mode as stored (``RelationHidden.stored``: ``none`` for the default ``hidden`` with
    hidden none; ``lowrank`` with its rank).
    ``truncate: true`` only with ``on_too_long: truncate`` (samples longer than ``max_length`` were
    cut to it; skip and error store the same samples, so they are not recorded)."""
    from .relation import parse_relation
    from .target_kinds import parse_targets

    kind = parse_targets(cfg.targets)
    settings = {"top_k": kind.top_k(cfg.top_k), "positions": list(cfg.positions),
                "logprob_dtype": cfg.logprob_dtype,
                "hidden": cfg.hidden, "temperature": float(cfg.temperature), "backend": cfg.backend,
                "relation": parse_relation(cfg.relation).stored(cfg.hidden).spec, "max_length": int(cfg.max_length),
                "world_size": int(world_size), "targets": cfg.targets}
    settings.update(kind.settings_extra(cfg))
    if cfg.on_too_long == "truncate":  # samples cut to max_length: the trainer must cut them alike
        settings["truncate"] = True
    return settings


def dataset_fingerprint(cfg: DumpConfig, num_rows: int) -> dict:
    return {"path": str(cfg.data), "num_rows": int(num_rows), "sha256": file_hash(cfg.data)}


def fingerprints(cfg: DumpConfig, model, processor, n_image: int, num_rows: int, world_size: int):
    """Teacher / tokenizer / dataset / settings dicts for the cache's group attributes."""
    from .models import config_hash, text_hash, tokenizer_hash

    tok = processor.tokenizer
    teacher = {"name_or_path": str(cfg.teacher), "config_hash": config_hash(model.config),
               "weights_hash": weights_hash(model),
               "vocab_size": int(model.lm_head.weight.shape[0]),
               "hidden_size": int(model.lm_head.weight.shape[1]), "dtype": str(model.dtype).replace("torch.", ""),
               "num_image_tokens": int(n_image)}
    tokenizer = {"name_or_path": str(cfg.teacher), "vocab_hash": tokenizer_hash(tok), "template": cfg.template,
                 "template_hash": text_hash(tok.chat_template if cfg.template == "chat" else cfg.template)}
    return teacher, tokenizer, dataset_fingerprint(cfg, num_rows), dump_settings(cfg, world_size)


# ---- checks before the teacher is loaded ------------------------------------------------------
def check_output(loc: CacheLocation) -> None:
    """Fail before any teacher work if the output cannot be written (probed with a real file:
    permission bits say nothing for root or on read-only mounts; a URL: one small object put and
    deleted, which also proves the bucket and the credentials)."""
    if not loc.is_local:
        probe = f".kdcache-probe-{uuid.uuid4().hex}"
        try:
            loc.put_bytes(probe, b"")
            loc.delete(probe)
        except Exception as e:  # botocore/aiohttp/permission errors: any of them means the same
            raise DumpError(f"output {loc} is not writable ({type(e).__name__}: {e}); check the bucket, the "
                            "credentials (AWS_* variables, profile) and AWS_ENDPOINT_URL / --storage-option "
                            "endpoint_url=...") from e
        return
    out = loc.local
    if out.exists() and not out.is_dir():
        raise DumpError(f"output {out} exists and is not a directory: choose another --out")
    target = out if out.exists() else out.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".kdcache-probe-"):
            pass
    except OSError as e:
        raise DumpError(f"output {out} is not writable ({target}: {e.strerror or e}): choose another --out") from e


def precheck_existing(out: CacheLocation, settings: dict, dataset: dict) -> None:
    """Refuse a run whose settings or data differ from the cache already at ``out`` (if any),
    naming every differing key; reads only the root ``zarr.json``, so the cache is untouched."""
    from .cache.format import CacheMismatch, attr_differences

    raw = out.read_bytes("zarr.json")
    if raw is None:
        return
    existing = json.loads(raw.decode("utf-8")).get("attributes", {})
    if "settings" not in existing:
        raise DumpError(f"{out} exists but is not a kdcache cache (no settings attribute): choose another --out")
    diffs = attr_differences({"settings": existing["settings"], "dataset": existing.get("dataset")},
                             {"settings": settings, "dataset": dataset})
    if diffs:
        raise CacheMismatch(
            f"cache {out} was made with different settings: " + "; ".join(diffs)
            + ". The cache is unchanged: rerun with the cache's settings, or dump to a new --out")


def check_model_settings(cfg: DumpConfig, model) -> None:
    """Refuse settings the loaded teacher cannot honour (checked before the cache is created, so a
    refused setting is never recorded)."""
    from .target_kinds import parse_targets

    V = int(model.lm_head.weight.shape[0])
    kind = parse_targets(cfg.targets)
    if kind.takes_top_k and not 1 <= kind.top_k(cfg.top_k) <= V:
        raise DumpError(f"--top-k {kind.top_k(cfg.top_k)} exceeds teacher {cfg.teacher}'s vocabulary of {V} ids: "
                        f"use --top-k {V} (exact) or less")


def refuse_all_skipped(cfg: DumpConfig, kept, skipped, world: int) -> None:
    """A dump in which every sample (of every rank) is skipped stores nothing: refuse it, before
    the cache exists, naming the reason counts and the likely fix (most often a wrong --images)."""
    n_kept = len(kept)
    if world > 1:
        import torch.distributed as tdist

        if tdist.is_initialized():
            t = torch.tensor([n_kept], dtype=torch.int64)
            if tdist.get_backend() == "nccl":
                t = t.cuda()
            tdist.all_reduce(t)
            n_kept = int(t.item())
    if n_kept == 0 and skipped.total:
        from .data.collate import all_skipped_error

        raise all_skipped_error(skipped, cfg.data, cfg.images, "dump", "nothing was written")


def load_teacher(cfg: DumpConfig, device: torch.device, dtype: torch.dtype | None = None):
    """(model, processor) of the teacher in eval mode on ``device``: ``dtype``, or by default bf16
    on CUDA and float32 on CPU.

    Refuses a kdcache-assembled model whose projector no stage has trained, and turns load
    failures (e.g. a hub id without network) into DumpError with the advice to pass a directory.
    """
    from .models import ModelLoadError, default_dtype, load_model, model_dir, projector_trained

    try:
        path = model_dir(cfg.teacher, "--teacher")
    except ModelLoadError as e:
        raise DumpError(f"cannot load teacher {cfg.teacher!r}: {e}") from e
    if not projector_trained(path):
        raise DumpError(
            f"teacher {cfg.teacher} has a projector no stage has trained (it came from `kdcache init-model`); "
            f"its targets would be noise. Train it first: `kdcache train --stage pt --student {cfg.teacher} "
            f"--data CAPTIONS.json --images DIR --out runs/teacher-pt`, then `kdcache train --stage sft "
            f"--student runs/teacher-pt ...`, and dump from that directory."
        )
    if dtype is None:
        dtype = default_dtype(device)
    try:
        model, processor = load_model(path, dtype=dtype, device=device)
    except ModelLoadError as e:
        raise DumpError(str(e)) from e
    model.requires_grad_(False).eval()
    return model, processor


def compile_teacher(model) -> None:
    """``torch.compile`` the teacher's vision tower and language model in place (``--compile``).

    The LLM is compiled with dynamic shapes: length bucketing gives each batch its own length,
    and a static compile would recompile for every one. The LM head and the top-k stay eager
    (``kdcache.teacher``): they run on chunks of positions already. Values equal the eager
    forward's up to float reassociation (tested)."""
    model.model.vision_tower.compile()
    model.model.language_model.compile(dynamic=True)


# ---- the run ---------------------------------------------------------------------------------
@dataclass
class RunStats:
    """What one rank did in this run (summed over ranks for the final line)."""

    samples: int = 0
    tokens: int = 0
    positions: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    already_done: int = 0  # samples committed by earlier runs (resume)
    padding: float = 0.0  # share of the teacher's [B, T_max] token slots that were padding


class BackgroundWriter:
    """A ``CacheWriter``'s adds, skips and timed flushes, run in order on one thread.

    ``submit(ops)`` queues one batch: TeacherRecords to ``add`` and (row, sample id, reason)
    tuples to ``skip``, then a ``flush`` when ``interval`` seconds have passed since the last.
    At most ``depth`` batches wait (their records hold device memory until written); depth 0
    runs every batch in the caller's thread instead. An error on the thread (a full disk) is
    raised in the caller at its next ``submit`` or at ``join``; later batches are not written.
    """

    def __init__(self, writer, interval: float, depth: int):
        import queue
        import threading

        self.writer, self.interval = writer, interval
        self.last_commit = time.perf_counter()
        self.error: BaseException | None = None
        self.q = queue.Queue(maxsize=depth) if depth else None
        self.thread = threading.Thread(target=self._loop, name="kdcache-writer", daemon=True) if depth else None
        if self.thread is not None:
            self.thread.start()

    def _write(self, ops) -> None:
        for op in ops:
            try:
                if isinstance(op, tuple):
                    self.writer.skip(*op)
                else:
                    self.writer.add(op)
            except Exception as e:  # name the sample in the error the CLI prints last
                row, sid = op[:2] if isinstance(op, tuple) else (op.row, op.sample_id)
                e.add_note(f"while writing sample {sid!r}, row {row}")
                raise
        if time.perf_counter() - self.last_commit >= self.interval:
            self.writer.flush()
            self.last_commit = time.perf_counter()

    def _loop(self) -> None:
        while (ops := self.q.get()) is not None:
            if self.error is None:
                try:
                    self._write(ops)
                except BaseException as e:  # handed to the caller's thread
                    self.error = e

    def submit(self, ops) -> None:
        if self.error is not None:
            raise self.error
        if self.q is None:
            self._write(ops)
        else:
            self.q.put(ops)

    def join(self, reraise: bool = True) -> None:
        """Wait until every queued batch is written; raise the thread's error if ``reraise``."""
        if self.thread is not None:
            self.q.put(None)
            self.thread.join()
            self.thread = None
        if reraise and self.error is not None:
            raise self.error


@dataclass(frozen=True)
class Skipped:
    """A sample the loader could not use (its image failed to decode), committed as a skip in its row's turn."""

    row: int
    sample_id: str
    reason: str
    error: str


def check_backend(cfg: DumpConfig, world: int) -> None:
    """Refuse settings ``cfg.backend`` cannot honour, and a missing vLLM (BackendUnavailable with
    the install hint), before anything is loaded or written."""
    from .backends import BACKENDS

    if cfg.backend not in BACKENDS:
        raise DumpError(f"unknown backend {cfg.backend!r}: choose from {', '.join(BACKENDS)}")
    if cfg.backend == "vllm":
        from .backends.vllm_dump import check_vllm_settings

        check_vllm_settings(cfg, world)


def dump(cfg: DumpConfig) -> Path | CacheLocation:
    """Write (or finish) the cache ``cfg.out``; returns its path (a URL: its location). Prints a progress bar per rank
    and, on rank 0 once every part is finished, one final line with the totals.

    ``cfg.backend``: ``hf`` (the reference) or ``vllm`` (engine settings ``cfg.vllm``)."""
    from .data.llava import DataError, read_llava_json

    from .cache.store import cache_location, store_errors

    validate(cfg)
    out = cache_location(cfg.out, cfg.storage_options, what="--out")  # refused here, before any work
    rank, world, local_rank = dist_env()
    check_backend(cfg, world)
    check_output(out)
    try:
        samples = read_llava_json(cfg.data)
    except (DataError, FileNotFoundError) as e:
        raise DumpError(f"cannot read the data file {cfg.data}: {e}") from e
    precheck_existing(out, dump_settings(cfg, world), dataset_fingerprint(cfg, len(samples)))
    interval = cfg.commit_every_s
    device = pick_device(cfg.device, local_rank)
    joined = init_distributed(world, device, cfg.dist_timeout_s)
    try:
        if cfg.backend == "vllm":
            from .backends.vllm_dump import dump_with_vllm

            stats = dump_with_vllm(cfg, out, samples, interval, device)
        else:
            model, processor = load_teacher(cfg, device)
            if cfg.compile:
                compile_teacher(model)
            stats = _dump_part(cfg, out, model, processor, samples, rank, world, interval)
        try:
            stats = _reduce(stats, world, device)
        except RuntimeError as e:  # gloo/nccl: a peer died or hung past dist_timeout_s
            raise DumpError(
                f"rank {rank}: its part is complete and committed, but a peer did not reach the end of the dump "
                f"within dist_timeout_s = {cfg.dist_timeout_s:g} s (timeout: dead or hung rank; {e}); rerun the "
                "same command to resume the unfinished parts") from e
        if rank == 0:
            print(final_line(out, stats), flush=True)
    except OSError as e:
        if not out.is_local:
            raise store_failure(out, rank, e) from e
        if e.errno not in _DISK_FULL:
            raise
        raise disk_full_error(out, rank, e) from e
    except store_errors() as e:  # botocore / aiohttp errors of a URL cache (not OSError)
        if out.is_local:
            raise
        raise store_failure(out, rank, e) from e
    finally:
        if joined:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return out.local if out.is_local else out


def relation_sqrt(model) -> torch.Tensor:
    """C [D, D] = ``gram_sqrt(W^T W)`` of the model's LM head (float32, on its device): the factor
    of every sample's logit Gram in ``relation: lowrank:R`` (``kdcache.relation``)."""
    from .relation import gram_sqrt

    return gram_sqrt(lm_gram(model.lm_head.weight.detach().float()))


def _dump_part(cfg: DumpConfig, out: CacheLocation, model, processor, samples, rank: int, world: int,
               interval: float, vllm_records=None, free_model: bool = False) -> RunStats:
    """Write this rank's part: rows ``row % world == rank`` not yet committed.

    ``vllm_records``: None (HF: ``teacher_records`` on collated batches), or a factory
    ``(kept samples, their Tokenized) -> (chunk of (sample, Tokenized) -> records)`` called once
    the model has served the fingerprints (and freed, with ``free_model``)."""
    import itertools

    from .cache.format import make_attrs
    from .cache.writer import CacheWriter, read_json_attrs
    from .data.collate import prepare_samples
    from .data.llava import SkipCounter
    from .models import image_token_id, num_image_tokens

    n_image = num_image_tokens(model.config, processor)
    tok = processor.tokenizer
    mine = [s for s in samples if s.row % world == rank]
    # Everything that can refuse the run does so before the writer creates (or touches) the cache:
    # a refused setting is never recorded, and a run that would store nothing leaves nothing.
    check_model_settings(cfg, model)
    prepared = windows = None
    if vllm_records is not None:  # vLLM takes every prompt at once: tokenised up front, in parallel
        prepared = prepare_samples(mine, tok, images_root=cfg.images, template=cfg.template,
                                   image_token_id=image_token_id(model.config), num_image_tokens=n_image,
                                   max_length=cfg.max_length, on_too_long=cfg.on_too_long,
                                   num_proc=max(1, cfg.num_workers))
        refuse_all_skipped(cfg, prepared[0], prepared[2], world)
    elif read_json_attrs(out, f"parts/{rank}") is None:
        # A fresh part: the HF path streams windows (tokenised in the loader's workers), so windows
        # are read until one holds a usable sample -- the first, normally -- before the cache is
        # created; only a dump in which every sample is skipped reads them all, and is refused.
        W = cfg.batch_size * cfg.bucket_batches
        it = iter(window_loader(cfg, processor, model.config, [mine[a:a + W] for a in range(0, len(mine), W)],
                                n_image))
        peeked, skips = [], SkipCounter()
        for win in it:
            peeked.append(win)
            skips.update(win["skipped"])
            if win["batches"] or win["failed"]:
                break
        usable = bool(peeked) and bool(peeked[-1]["batches"] or peeked[-1]["failed"])
        refuse_all_skipped(cfg, [None] if usable else [], skips, world)
        windows = itertools.chain(peeked, it)
    else:  # resuming a part: it exists, so something was committed or kept (every rank joins the count)
        refuse_all_skipped(cfg, [None], SkipCounter(), world)
    teacher_fp, tok_fp, data_fp, settings = fingerprints(cfg, model, processor, n_image, len(samples), world)
    attrs = make_attrs(teacher_fp, tok_fp, data_fp, settings)
    writer = CacheWriter(out, attrs, rank=rank, world_size=world)
    try:
        return _write_part(cfg, out, model, processor, mine, prepared, windows, n_image, tok, writer, rank,
                           interval, vllm_records, free_model)
    except BaseException:
        writer.abandon()  # keep what is committed; let a rerun (even in this process) take the part
        raise


def _write_part(cfg: DumpConfig, out: CacheLocation, model, processor, mine, prepared, windows, n_image: int, tok, writer,
                rank: int, interval: float, vllm_records, free_model: bool) -> RunStats:
    """``_dump_part``'s body once the writer holds the part (its lock is released on any error).
    ``prepared``: ``prepare_samples`` of ``mine`` (kept, their Tokenized, SkipCounter) for vLLM, else
    None; ``windows``: the HF path's window items from row 0 of a fresh part (None: a loader is made
    from the resume point)."""
    from tqdm.auto import tqdm

    from .cache.format import GRAM_ARRAY, LM_HEAD_ARRAY

    done = set(writer.committed_rows())
    stats = RunStats(already_done=len(done))
    if writer.is_finished():
        from .cache.format import STATUS_OK

        n = writer.num_committed
        status = writer.index["status"][:n] if n else []
        skipped_rows = {r for r, st in zip(writer.committed_rows(), status) if int(st) != STATUS_OK}
        if prepared is None:  # the HF path tokenises as it goes: here, once, to see what is usable now
            from .data.collate import prepare_samples
            from .models import image_token_id

            prepared = prepare_samples(mine, tok, images_root=cfg.images, template=cfg.template,
                                       image_token_id=image_token_id(model.config), num_image_tokens=n_image,
                                       max_length=cfg.max_length, on_too_long=cfg.on_too_long,
                                       num_proc=max(1, cfg.num_workers))
        kept_now = {s.row for s in prepared[0]}
        if kept_now and len(skipped_rows) == n and kept_now <= skipped_rows:
            # an older kdcache finished parts whose every row was skipped (a wrong --images, say);
            # those rows are usable now, but a finished part is never rewritten
            raise DumpError(f"part {rank} of {out} is finished but every row of it was skipped by the run that "
                            f"made it, and {len(kept_now)} of them are usable now: remove {out} and dump again")
        if kept_now & skipped_rows:  # a finished part is valid as it is: say what it lacks, and how to get it
            print(f"[rank {rank}] note: {len(kept_now & skipped_rows)} rows the run that made {out} skipped are "
                  f"usable now (e.g. row {min(kept_now & skipped_rows)}); the cache is kept as it is: remove it and "
                  "dump again to include them", file=sys.stderr, flush=True)
        print(f"[rank {rank}] part {rank} of {out} is already complete ({len(done)} samples committed); "
              "nothing to do", flush=True)
        writer.abandon()  # writes nothing: releases the flock / deletes the lease object
        return stats
    from .target_kinds import parse_targets

    kind = parse_targets(cfg.targets)
    exact = kind.exact
    if exact and model.lm_head.bias is not None:
        raise DumpError(f"--targets hidden stores H and the LM head so that logits = H W^T, but teacher "
                        f"{cfg.teacher} has an lm_head.bias {tuple(model.lm_head.bias.shape)}: use --targets topk "
                        "or sampled:N")
    my_keys = [f"parts/{rank}"] + ([GRAM_ARRAY] if rank == 0 else [])  # key prefixes this rank writes
    if rank == 0 and exact:
        my_keys.append(LM_HEAD_ARRAY)
    bytes0 = sum(out.nbytes(d) for d in my_keys)
    if rank == 0:
        # M_t = W^T W [D, D]: relation targets in logit space without an [N, V] matrix
        writer.write_gram(lm_gram(model.lm_head.weight.detach().float()).cpu().numpy())
        if exact:  # W [V, D] itself: the trainer recovers the full distribution as softmax(H W^T / T)
            writer.write_lm_head(model.lm_head.weight.detach().cpu())
    # Batches are sorted by length inside windows of W consecutive samples of this rank (little
    # padding). A sample's batch -- hence its padded shape, hence its exact float results -- is a
    # pure function of the rank's rows, whatever a crash left committed: commits go in row order,
    # so only the window holding the first undone row is partly done, and it is rerun whole (its
    # done rows' records dropped). That keeps a resumed cache equal, bit for bit, to an
    # uninterrupted one.
    W = cfg.batch_size * cfg.bucket_batches
    first_todo = next((i for i, s in enumerate(mine) if s.row not in done), len(mine))
    if vllm_records is None:
        # windows are tokenised in the loader's workers as they are needed: the teacher starts
        # after one window, whatever the dataset's size
        if windows is None:
            start = (first_todo // W) * W
            windows = window_loader(cfg, processor, model.config, [mine[a:a + W] for a in range(start, len(mine), W)],
                                    n_image)
        ops_batches = _hf_ops(cfg, model, windows, done, stats)
    else:
        ops_batches = _vllm_ops(cfg, model, prepared, mine[first_todo:], done, vllm_records, free_model)

    bar = tqdm(total=len(mine), initial=len(done), desc=f"dump rank {rank}", unit="sample",
               dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    # The writer runs on its own thread (cfg.write_thread): while it copies a batch's records to
    # the host, compresses and writes them, this thread already runs the teacher on the next one.
    bg = BackgroundWriter(writer, interval, depth=2 if cfg.write_thread else 0)
    try:
        for due in ops_batches:  # records, skips and loader-time image failures, in row order
            ops = []
            for r in due:
                if isinstance(r, Skipped):  # its image failed to decode in the loader
                    ops.append((r.row, r.sample_id, r.reason))
                    stats.skipped[r.reason] = stats.skipped.get(r.reason, 0) + 1
                    bar.write(f"skipped: {r.error}", file=sys.stderr)
                    continue
                ops.append(r)
                if isinstance(r, tuple):
                    stats.skipped[r[2]] = stats.skipped.get(r[2], 0) + 1
                    continue
                stats.samples += 1
                stats.tokens += r.num_tokens
                stats.positions += len(r.positions)
            bg.submit(ops)
            if stats.tokens:  # no rate before a record came (a length-sorted window arrives out of order)
                dt = time.perf_counter() - t0
                bar.set_postfix({"tok/s": f"{stats.tokens / dt:.0f}", "pos/s": f"{stats.positions / dt:.0f}"},
                                refresh=False)
            bar.update(len(ops))
    except BaseException:
        bg.join(reraise=False)  # the loop's own error wins; what the thread committed stays
        bar.close()  # before the error is printed, so that the error is the last line
        raise
    try:
        bg.join()  # re-raises the writer thread's error (e.g. a full disk)
    finally:
        bar.close()
    writer.close(finished=True)
    stats.seconds = time.perf_counter() - t0
    stats.bytes_written = max(0, sum(out.nbytes(d) for d in my_keys) - bytes0)
    return stats


def window_loader(cfg: DumpConfig, processor, model_config, windows, n_image: int):
    """DataLoader of ``kdcache.data.collate.WindowDataset`` over ``windows`` (lists of consecutive
    samples): one item per window, in order, tokenised and collated in ``cfg.num_workers`` worker
    processes (one window in flight per worker)."""
    from .data.collate import WindowDataset
    from .models import image_token_id

    ds = WindowDataset(windows, processor.tokenizer, processor.image_processor, cfg.images, batch_size=cfg.batch_size,
                       template=cfg.template, image_token_id=image_token_id(model_config),
                       num_image_tokens=n_image, max_length=cfg.max_length, on_too_long=cfg.on_too_long)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                                       prefetch_factor=1 if cfg.num_workers else None)


def _hf_ops(cfg: DumpConfig, model, windows, done: set, stats: RunStats):
    """The HF backend's output: per teacher batch, the records and skips now due, in row order
    (rows in ``done`` dropped), from ``window_loader``'s items."""
    from .relation import HIDDEN_TORCH_DTYPES, parse_relation
    from .target_kinds import parse_targets
    from .teacher import teacher_records

    kind = parse_targets(cfg.targets)
    relation = parse_relation(cfg.relation).stored(cfg.hidden)
    # lowrank: C = sqrt(W^T W) [D, D] once per dump (an eigh), each sample's factor per batch
    c = relation_sqrt(model) if relation.factored else None
    tokens = slots = 0
    for win in windows:
        tokens, slots = tokens + win["tokens"], slots + win["slots"]
        stats.padding = 1.0 - tokens / slots if slots else 0.0
        due = [r for r in win["rows"] if r not in done]
        pending = {row: (row, sid, why) for row, sid, why in win["skipped"].items if row not in done}
        pending.update((it["row"], Skipped(it["row"], it["sample_id"], it["skipped"], it["error"]))
                       for it in win["failed"] if it["row"] not in done)  # images that failed in the loader
        nxt = 0
        for batch in win["batches"] + [None]:  # None: what is due after the window's last batch
            if batch is not None:
                recs = teacher_records(model, batch, kinds=cfg.positions, top_k=kind.top_k(cfg.top_k),
                                       temperature=cfg.temperature, with_hidden=relation.has_targets,
                                       chunk_size=cfg.chunk_size, targets=cfg.targets, draw_seed=cfg.draw_seed,
                                       relation=relation.spec, relation_sqrt=c,
                                       relation_dtype=HIDDEN_TORCH_DTYPES[cfg.hidden] if c is not None
                                       else torch.bfloat16)  # not used without a factor
                pending.update((r.row, r) for r in recs if r.row not in done)
            out = []
            while nxt < len(due) and due[nxt] in pending:
                out.append(pending.pop(due[nxt]))
                nxt += 1
            yield out
        if nxt < len(due):
            raise RuntimeError(f"rows {due[nxt:nxt + 5]} of a window got neither a record nor a skip")


def _vllm_ops(cfg: DumpConfig, model, prepared, todo, done: set, vllm_records, free_model: bool):
    """The vLLM backend's output, as ``_hf_ops``: the ``prepared`` samples of ``todo`` not in
    ``done``, in batches of ``cfg.batch_size`` in row order, each batch's skips before it."""
    rows = {s.row for s in todo if s.row not in done}
    pairs = [(s, t) for s, t in zip(prepared[0], prepared[1]) if s.row in rows]
    kept, toks = [s for s, _ in pairs], [t for _, t in pairs]
    skips = sorted(it for it in prepared[2].items if it[0] in rows)
    if free_model:
        # vLLM loads its own copy of the weights: drop the CPU copy's storage (every reference
        # to the module, the caller's included, then sees meta tensors).
        model.to("meta")
    vrec = vllm_records(kept, toks)
    j = 0
    for i in range(0, len(pairs), cfg.batch_size):
        recs = vrec(pairs[i:i + cfg.batch_size])
        out = []
        for r in recs:
            while j < len(skips) and skips[j][0] < r.row:
                out.append(skips[j])
                j += 1
            out.append(r)
        yield out
    yield skips[j:]


def _reduce(stats: RunStats, world: int, device: torch.device) -> RunStats:
    """Sum the ranks' stats on every rank (time: the slowest rank); also the barrier after which
    rank 0 may report, every part being finished."""
    if world <= 1:
        return stats
    import torch.distributed as tdist

    from .data.llava import SKIP_REASONS

    dev = device if device.type == "cuda" else torch.device("cpu")
    v = torch.tensor([stats.samples, stats.tokens, stats.positions, stats.bytes_written, stats.already_done]
                     + [stats.skipped.get(r, 0) for r in SKIP_REASONS], dtype=torch.float64, device=dev)
    t = torch.tensor([stats.seconds, stats.padding], dtype=torch.float64, device=dev)
    tdist.all_reduce(v, op=tdist.ReduceOp.SUM)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    v = [int(x) for x in v.tolist()]
    return RunStats(samples=v[0], tokens=v[1], positions=v[2], bytes_written=v[3], already_done=v[4],
                    seconds=float(t[0]), padding=float(t[1]),  # padding: the worst rank's
                    skipped={r: n for r, n in zip(SKIP_REASONS, v[5:]) if n})


def final_line(out: CacheLocation, stats: RunStats) -> str:
    """One line: what this run did (all ranks), then what the whole cache holds now.

    e.g. ``dump done: 58 samples, 4797 tokens, 1341 positions in 5.1 s (11.4 samples/s,
    944 tokens/s); wrote 0.41 MiB (318 bytes/position); cache c.zarr: 58 samples in 1 part(s),
    0.43 MiB; skipped 2 samples: 1 missing_image, 1 no_image_token``
    """
    from collections import Counter

    from .cache.reader import CacheReader

    reader = CacheReader(out, check=False)
    why = Counter(reason for _row, _sid, reason in reader.skipped())
    n_skip = sum(why.values())
    skip_txt = (f"skipped {n_skip} sample{'s' if n_skip != 1 else ''}"
                + (": " + ", ".join(f"{n} {r}" for r, n in sorted(why.items())) if n_skip else ""))
    dt = max(stats.seconds, 1e-9)
    run = (f"dump done: {stats.samples} samples, {stats.tokens} tokens, {stats.positions} positions "
           f"in {stats.seconds:.1f} s ({stats.samples / dt:.1f} samples/s, {stats.tokens / dt:.0f} tokens/s); "
           f"wrote {stats.bytes_written / 2**20:.2f} MiB"
           + (f" ({stats.bytes_written / stats.positions:.0f} bytes/position)" if stats.positions else "")
           + (f"; padding {100 * stats.padding:.1f}% of the teacher's token slots" if stats.samples else ""))
    if stats.samples == 0 and stats.already_done:
        run = f"nothing to do: all {stats.already_done} rows were already committed"
    elif stats.already_done:
        run += f"; resumed after {stats.already_done} rows committed earlier"
    cache = (f"cache {out}: {reader.num_samples} samples in {len(reader.parts)} part(s), "
             f"{out.nbytes() / 2**20:.2f} MiB")
    return f"{run}; {cache}; {skip_txt}"
