"""The dump's vLLM path (``kdcache dump --backend vllm``): settings checks, the records source and the run.

``kdcache.dump`` calls ``check_vllm_settings`` before anything is loaded and ``dump_with_vllm``
instead of its HF loop; the engine adapter itself (prompt log-probs -> records) is
``kdcache.backends.vllm``. Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kdcache.config import DumpConfig
from kdcache.dump import RunStats


def check_vllm_settings(cfg: DumpConfig, world: int) -> None:
    """Refuse the settings vLLM cannot honour, and a missing vLLM (BackendUnavailable with the
    install hint), before anything is loaded or written (``kdcache.dump.check_backend``)."""
    from kdcache.dump import DumpError

    if cfg.temperature != 1.0:
        raise DumpError(f"--backend vllm gives raw log-probs at temperature 1, got --temperature {cfg.temperature}: "
                        "use --temperature 1 or --backend hf")
    if cfg.targets != "topk":
        raise DumpError(f"--backend vllm gives top-k log-probs only (targets topk), got --targets {cfg.targets}: "
                        "use --backend hf for it")
    if world > 1:
        raise DumpError(f"--backend vllm runs as one process (got WORLD_SIZE={world}): spread the teacher over GPUs "
                        "with vLLM's tensor parallelism (--vllm-tensor-parallel-size) instead of torchrun/accelerate")
    from .vllm import import_vllm

    import_vllm()


def vllm_record_factory(cfg: DumpConfig, model, processor, make_engine):
    """The vLLM backend's records source for ``_dump_part(vllm_records=...)``.

    ``make_engine()`` -> an object with ``prompt_logprobs(items) -> [vLLM prompt_logprobs]`` for
    items [(Tokenized, PIL image or None)] (``kdcache.backends.vllm.VllmTeacher``; tests pass
    vLLM-shaped outputs of the HF teacher). It is called once the HF model has served the
    fingerprints (and was freed, without hidden states). Per chunk of (sample, Tokenized):
    vLLM's log-probs -> ``records_from_prompt_logprobs``; with ``cfg.hidden != "none"`` plus
    ``visual_hidden_states(model, batch)`` of the HF teacher on the same ids and pixels, merged
    per sample (``with_hidden``).
    """
    from kdcache.data.collate import collate
    from kdcache.data.llava import load_image
    from kdcache.dump import relation_sqrt
    from kdcache.relation import HIDDEN_TORCH_DTYPES, factor_records, parse_relation
    from kdcache.teacher import visual_hidden_states

    from .vllm import records_from_prompt_logprobs, with_hidden

    vocab = int(model.lm_head.weight.shape[0])  # read now: the model may be freed before the engine starts
    pad_id = processor.tokenizer.pad_token_id
    relation = parse_relation(cfg.relation).stored(cfg.hidden)
    # lowrank: C = sqrt(W^T W) once, now, while the HF weights are there
    c = relation_sqrt(model) if relation.factored else None

    def make(kept, toks):
        engine = make_engine()

        def records(chunk):
            images = [load_image(Path(cfg.images) / s.image, s) if s.has_image else None for s, _ in chunk]
            pls = engine.prompt_logprobs([(t, im) for (_, t), im in zip(chunk, images)])
            recs = [records_from_prompt_logprobs(pl, input_ids=t.input_ids, roles=t.roles, sample_id=t.sample_id,
                                                 row=t.row, kinds=cfg.positions, top_k=cfg.top_k, vocab_size=vocab)
                    for (_, t), pl in zip(chunk, pls)]
            if not relation.has_targets:
                return recs
            # The same PIL image vLLM got, through the teacher's image processor as the HF backend does.
            items = [{"sample_id": t.sample_id, "row": t.row, "input_ids": torch.from_numpy(t.input_ids),
                      "labels": torch.from_numpy(t.labels), "roles": torch.from_numpy(t.roles),
                      "pixel_values": None if im is None
                      else processor.image_processor(images=im, return_tensors="pt")["pixel_values"][0]}
                     for (_, t), im in zip(chunk, images)]
            step = cfg.vllm.hf_batch_size
            hidden = [h for i in range(0, len(items), step)
                      for h in visual_hidden_states(model, collate(items[i:i + step], pad_id))]
            recs = with_hidden(recs, hidden)
            return factor_records(recs, c, relation.rank, HIDDEN_TORCH_DTYPES[cfg.hidden]) if c is not None else recs
        return records
    return make


def dump_with_vllm(cfg: DumpConfig, out: "CacheLocation", samples, interval: float, device: torch.device,
               make_engine=None) -> RunStats:
    """The vLLM backend: fingerprints and W^T W from the HF weights (loaded in vLLM's dtype),
    log-probs from ``VllmTeacher`` (or ``make_engine()``, see ``vllm_record_factory``: the tests'
    vLLM-shaped outputs), written exactly as the HF path writes.

    ``--hidden none``: the HF copy sits on the CPU and is freed before vLLM starts. Otherwise
    (hybrid) it stays, on ``device`` (the GPU when there is one), for the visual hidden states;
    it is loaded first, so vLLM's ``gpu_memory_utilization`` share must leave room for it
    (``kdcache.config.vllm_gpu_memory_utilization``: 0.6 by default in this mode)."""
    from kdcache.config import vllm_gpu_memory_utilization
    from kdcache.dump import _dump_part, load_teacher
    from kdcache.relation import parse_relation

    from .vllm import VllmTeacher

    hf_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.vllm.dtype]
    hybrid = parse_relation(cfg.relation).stored(cfg.hidden).has_targets  # relation targets need HF hidden states
    if hybrid:
        print(f"[vllm] log-probs from vLLM, visual hidden states from the HF teacher on {device} (prefix up to "
              "the image's end)", file=sys.stderr, flush=True)
    else:
        print("[vllm] relation none: no hidden states, no L_rel targets in this cache", file=sys.stderr, flush=True)
    model, processor = load_teacher(cfg, device if hybrid else torch.device("cpu"), dtype=hf_dtype)
    vocab = int(model.lm_head.weight.shape[0])
    gpu_share = vllm_gpu_memory_utilization(cfg)

    def engine():
        return VllmTeacher(str(cfg.teacher), top_k=cfg.top_k, engine=cfg.vllm, gpu_memory_utilization=gpu_share,
                           vocab_size=vocab)

    return _dump_part(cfg, out, model, processor, samples, 0, 1, interval, free_model=not hybrid,
                      vllm_records=vllm_record_factory(cfg, model, processor, make_engine or engine))
