"""Benchmark the teacher dump: tokens/s and bytes per distilled position, chunked vs naive.

    python bench/dump.py                                   # CPU: tiny teacher, reduced shapes (~10-30 s)
    python bench/dump.py --compare-naive                   # + the naive full-logits path, side by side
    python bench/dump.py --preset random:qwen2.5-3b --batch-size 16 --num-samples 256 --compare-naive
                                                           # GPU: SigLIP-so400m + Qwen2.5-3B, 729 + 128 tokens
    python bench/dump.py --preset random:qwen2.5-3b --batch-size 16 --num-samples 256 --compare-naive --compile
                                                           # + the teacher torch.compiled (`dump --compile`)
    python bench/dump.py --teacher runs/teacher-sft        # a real LLaVA directory
    python bench/dump.py --teacher runs/teacher-sft --backend vllm   # + the vLLM backend, side by side

What is timed: exactly the dump's inner loop, teacher forward -> records -> ``CacheWriter.add``,
plus the final flush/close, over pre-built batches (data loading and image decoding are not the
teacher's cost). ``--batches host`` (default) holds them as the dump's DataLoader hands them
over: token ids, mask and float32 pixels in (pageable) host memory, so the host-to-device copies
and the syncs they bring are timed as in ``kdcache dump``; ``--batches device`` puts them on the
GPU beforehand (the teacher's work alone). One untimed warm-up batch goes first; CUDA is
synchronised before the clock is read (and ``writer.add`` copies each record to the host anyway).

- ``kdcache``: ``kdcache.teacher.teacher_records``: hidden states from the LLM, the LM head only at
  the distilled positions, in chunks (the [B, T, V] logits never exist), exact log-sum-exp tail.
- ``kdcache`` writes as the dump does, on the writer thread (``kdcache.dump.BackgroundWriter``)
  while the teacher runs the next batch; ``GPU busy`` is the stream time inside each batch's
  teacher work over the wall time (CUDA events; n/a on CPU), ``MFU`` the model FLOPs per second
  (``sample_flops``: padding not counted) over a matmul peak measured in the same run.
- ``naive`` (``--compare-naive``, writes inline): a plain ``model(...).logits`` over every position, then
  ``log_softmax`` + ``topk`` on the whole [B, T, V] and the tail as ``log(1 - sum p)`` (cheaper
  than the exact tail, so the comparison is, if anything, generous to the naive path).

Both write through the same writer into their own cache, so bytes/position is measured on disk
(all arrays, visual hidden states included; ``hidden B/vis-row`` shows that part alone).

- ``vllm`` (``--backend vllm``, needs ``--teacher DIR`` and ``pip install 'kdcache[vllm]'``; skipped
  with a message when vLLM is missing): ``kdcache.backends.vllm.VllmTeacher`` on the same ids and
  images (PIL images, which the HF path then sees through the teacher's image processor), engine
  start-up and one warm-up batch untimed; no hidden states (its cache has ``hidden: none``).

Samples are synthetic token ids: ``--prompt-tokens`` before and after the image (an eighth
before), the image span (the model's visual token count: 729 for SigLIP-so400m/14@384), then
response tokens up to ``--text-tokens``; random pixels. Every sample has the same length, so
batches carry no padding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _report
from kdcache.cache.format import make_attrs
from kdcache.cache.reader import CacheReader
from kdcache.cache.writer import CacheWriter
from kdcache.config import DumpConfig
from kdcache.dump import BackgroundWriter, dump_settings
from kdcache.models import config_hash, image_token_id, load_model, num_image_tokens
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL, select_positions, visual_span
from kdcache.records import TeacherRecord
from kdcache.teacher import teacher_records

KINDS = ("visual", "response")


# ---- the model -------------------------------------------------------------------------------
def build_preset(preset: str, vocab_size: int | None, device: torch.device, dtype: torch.dtype,
                 layers: int | None = None):
    """A random-init LLaVA of a kdcache preset's shapes, built in memory on ``device`` (nothing is
    written to disk; no tokenizer needed). ``vocab_size`` overrides the preset's; ``layers`` the
    number of LLM and vision layers (a CPU check of the real widths)."""
    from transformers import LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from kdcache import models

    if preset in models.TINY_LLM:
        V = vocab_size or 32768
        tc = Qwen2Config(vocab_size=V, tie_word_embeddings=False, **models.TINY_LLM[preset])
        vc = SiglipVisionConfig(**models.TINY_VISION)
    elif preset.startswith("random:") and preset[7:] in models.QWEN_SHAPES:
        shape = dict(models.QWEN_SHAPES[preset[7:]])
        if vocab_size:
            shape["vocab_size"] = vocab_size
        cut = {"num_hidden_layers": layers} if layers else {}
        tc = Qwen2Config(**(shape | cut))
        vc = SiglipVisionConfig(**(models.SIGLIP_SO400M | cut))
    else:
        raise SystemExit(f"unknown preset {preset!r}: choose from {', '.join(models.PRESETS)}")
    config = models.llava_config(tc, vc, tc.vocab_size - 1)  # last id stands for <image>
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds for 3B on a GPU
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def synthetic_batches(model, n_image: int, num_samples: int, batch_size: int, text_tokens: int,
                      prompt_tokens: int, device, seed: int = 0) -> list[dict]:
    """Collated batches like ``kdcache.data.collate`` makes: ids, mask and pixels on ``device``
    (pixels in the model's dtype), or on the CPU with float32 pixels, as the collate gives them."""
    cfg = model.config
    V = model.lm_head.weight.shape[0]
    img = image_token_id(cfg)
    size = cfg.vision_config.image_size
    before = max(1, prompt_tokens // 8)
    response = text_tokens - prompt_tokens
    if response < 1:
        raise SystemExit(f"--text-tokens {text_tokens} must exceed --prompt-tokens {prompt_tokens}")
    roles = np.concatenate([np.full(before, ROLE_PROMPT), np.full(n_image, ROLE_VISUAL),
                            np.full(prompt_tokens - before, ROLE_PROMPT), np.full(response, ROLE_RESPONSE)]
                           ).astype(np.uint8)  # [T]
    T = roles.shape[0]
    g = torch.Generator().manual_seed(seed)
    batches = []
    for s in range(0, num_samples, batch_size):
        B = min(batch_size, num_samples - s)
        ids = torch.randint(0, V - 1, (B, T), generator=g)
        ids[ids == img] = 0
        ids[:, torch.from_numpy(roles == ROLE_VISUAL)] = img
        pix = torch.randn(B, 3, size, size, generator=g)
        batches.append({
            "input_ids": ids.to(device), "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
            "roles": torch.from_numpy(roles).expand(B, T).clone(),
            "pixel_values": pix if device.type == "cpu" else pix.to(device=device, dtype=model.dtype),
            "sample_ids": [f"bench-{s + b:06d}" for b in range(B)], "rows": list(range(s, s + B)),
        })
    return batches


def use_pil_images(batches: list[dict], processor, device, dtype, seed: int = 2) -> list[list]:
    """Random RGB PIL images per sample (what vLLM takes); each batch's pixel_values become the
    teacher's image processor's output for them, so both backends see the same pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = 64
    images = []
    for b in batches:
        ims = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in b["rows"]]
        b["pixel_values"] = processor.image_processor(images=ims, return_tensors="pt")["pixel_values"].to(
            device=device, dtype=dtype)
        images.append(ims)
    return images


def run_vllm(teacher_dir: str, batches, images, warmup_index: int, out: Path, attrs: dict, top_k: int,
             vocab: int) -> dict:
    """The vLLM backend over the same samples: records -> the same writer; engine start-up and one
    warm-up batch are not timed."""
    from types import SimpleNamespace

    from kdcache.backends.vllm import VllmTeacher
    from kdcache.config import VLLM_GPU_MEMORY_WITH_HF, VllmConfig

    # The HF teacher of the first row is still on the GPU: vLLM takes the share it has when the
    # dump's hybrid mode keeps the HF teacher beside it.
    teacher = VllmTeacher(teacher_dir, top_k=top_k, engine=VllmConfig(), gpu_memory_utilization=VLLM_GPU_MEMORY_WITH_HF,
                          vocab_size=vocab)

    def items(b, ims):
        return [(SimpleNamespace(input_ids=b["input_ids"][i].cpu().numpy(), roles=b["roles"][i].numpy(),
                                 sample_id=b["sample_ids"][i], row=b["rows"][i]), ims[i]) for i in range(len(ims))]

    teacher.records(items(batches[warmup_index], images[warmup_index]), kinds=KINDS)
    writer = CacheWriter(out, attrs)
    n_tok = n_pos = n_samples = 0
    t0 = time.perf_counter()
    for b, ims in zip(batches, images):
        for r in teacher.records(items(b, ims), kinds=KINDS):
            writer.add(r)
            n_tok += r.num_tokens
            n_pos += len(r.positions)
            n_samples += 1
    writer.close(finished=True)
    dt = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in (out / "parts" / "0").rglob("*") if f.is_file())
    return {"path": "vllm", "samples": n_samples, "seconds": dt, "tokens/s": n_tok / dt, "samples/s": n_samples / dt,
            "positions/s": n_pos / dt, "TFLOP/s": float("nan"), "MFU": float("nan"), "GPU busy": float("nan"),  # vLLM's model FLOPs: not counted
            "B/position": nbytes / max(n_pos, 1), "hidden B/vis-row": 0.0,
            "peak GiB": float("nan")}


# ---- the naive path --------------------------------------------------------------------------
@torch.no_grad()
def naive_records(model, batch: dict, *, kinds, top_k: int, with_hidden: bool) -> list[TeacherRecord]:
    """Records the obvious way: full logits [B, T, V], log_softmax and top-k over all of them."""
    dev = model.device
    out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                pixel_values=batch["pixel_values"].to(dev, model.dtype), output_hidden_states=with_hidden,
                use_cache=False)
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, T, V]
    top, idx = logp.topk(top_k, dim=-1)  # [B, T, k]
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0))  # [B, T]  log(1 - sum p): the naive tail
    roles = batch["roles"].numpy()
    recs = []
    for b in range(roles.shape[0]):
        pos, kc = select_positions(roles[b], kinds)
        p = torch.from_numpy(pos).to(idx.device).long()
        recs.append(TeacherRecord(
            sample_id=batch["sample_ids"][b], row=batch["rows"][b],
            input_ids=batch["input_ids"][b].to(torch.int32), roles=batch["roles"][b],
            positions=torch.from_numpy(pos), kinds=torch.from_numpy(kc),
            topk_ids=idx[b, p].to(torch.int32), topk_logprobs=top[b, p],
            tail_logmass=tail[b, p],
            visual_hidden=(out.hidden_states[-1][b, torch.from_numpy(visual_span(roles[b])).to(idx.device)]
                           if with_hidden else None)))
    return recs


# ---- the run ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(name: str, fn, model, batches, warmup, out: Path, attrs: dict, device, top_k: int,
             hidden: bool, peak: float, write_thread: bool = True, rep=None) -> dict:
    """Warm up, then time forward + records + writer over ``batches`` (fewer when ``rep``'s
    deadline comes near: at least one); returns a row of the table."""
    if rep is not None:
        rep.doing(name)
    t_w = time.perf_counter()
    fn(model, warmup, kinds=KINDS, top_k=top_k, with_hidden=hidden)
    sync(device)
    t_w = time.perf_counter() - t_w
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    writer = CacheWriter(out, attrs)
    # the dump's own write path: records copied, compressed and written on a thread (write_thread)
    bg = BackgroundWriter(writer, interval=60.0, depth=2 if write_thread else 0)
    n_tok = n_pos = n_samples = 0
    flops = 0.0
    events = []  # CUDA: (start, end) around each batch's teacher work, for the GPU-busy share
    sync(device)
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        # each batch costs about the warm-up's time or less; keep two for the drain and close
        if i and rep is not None and not rep.fits(3 * min(t_w, (time.perf_counter() - t0) / i) + 2):
            rep.note(f"{name}: stopped after {i} of {len(batches)} batches (table budget)")
            break
        if device.type == "cuda":
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        recs = fn(model, batch, kinds=KINDS, top_k=top_k, with_hidden=hidden)
        if device.type == "cuda":
            events[-1][1].record()
        flops += sample_flops(model, batch, sum(len(r.positions) for r in recs))
        bg.submit(list(recs))
        for r in recs:
            n_tok += r.num_tokens
            n_pos += len(r.positions)
            n_samples += 1
    sync(device)
    t_loop = time.perf_counter() - t0
    bg.join()
    writer.close(finished=True)
    sync(device)
    dt = time.perf_counter() - t0
    # stream time inside the batches' event pairs over the wall time: below 1 the GPU waited
    # (on the host, the copies, the writer); an upper bound when kernels leave gaps inside a batch
    stream = sum(a.elapsed_time(b) for a, b in events) / 1e3 if events else float("nan")
    busy = stream / dt
    # the same over the loop alone: the share a long dump approaches, where the final drain of the
    # writer (``tail s``: the last batches' compression and writes, the close) is amortised
    busy_loop = stream / t_loop
    part = out / "parts" / "0"
    nbytes = sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
    hbytes = sum(f.stat().st_size for f in (part / "visual_hidden").rglob("*") if f.is_file()) if hidden else 0
    n_vis = CacheReader(out, check=False).parts[0].totals["visual"]
    return {"path": name, "samples": n_samples, "seconds": dt, "tokens/s": n_tok / dt, "samples/s": n_samples / dt,
            "positions/s": n_pos / dt, "TFLOP/s": flops / dt / 1e12, "MFU": flops / dt / peak, "GPU busy": busy,
            "busy (loop)": busy_loop, "tail s": dt - t_loop, "warm-up s": t_w,
            "B/position": nbytes / max(n_pos, 1),
            "hidden B/vis-row": hbytes / max(n_vis, 1),
            "peak GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s in ``dtype`` on ``device`` (the MFU denominator): the best of
    a few square products, 8192 on CUDA, 1024 on CPU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sample_flops(model, batch: dict, positions: int) -> float:
    """Forward FLOPs the dump needs for a batch: 2 x parameters per token for the LLM body (embedding
    excluded), causal attention 2 L T^2 d per sample, the vision tower over its patches and the
    projector over the image tokens (2 x parameters each), and the LM head at the distilled
    ``positions`` only (2 V D each). Padding is not counted: it is waste, not work."""
    lm = model.model.language_model
    p_llm = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    cfg = model.config.text_config
    p_vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    p_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    v_cfg = model.config.vision_config
    patches = (v_cfg.image_size // v_cfg.patch_size) ** 2
    lengths = batch["attention_mask"].sum(1).tolist()
    n_img = 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
    n_image_tokens = int((batch["roles"] == ROLE_VISUAL).sum())
    V, D = model.lm_head.weight.shape
    return (2 * p_llm * sum(lengths) + sum(2 * cfg.num_hidden_layers * t * t * cfg.hidden_size for t in lengths)
            + 2 * p_vis * patches * n_img + 2 * p_proj * n_image_tokens + 2 * V * D * positions)


def agreement(a: Path, b: Path, n: int = 8) -> str:
    """Top-1 agreement and largest top-1 log-prob difference between two caches' first n samples."""
    ra, rb = CacheReader(a, check=False), CacheReader(b, check=False)
    same, total, diff = 0, 0, 0.0
    for x, y in zip(ra.read_range(0, 0, n), rb.read_range(0, 0, n)):
        same += int((x.topk_ids[:, 0] == y.topk_ids[:, 0]).sum())
        total += x.topk_ids.shape[0]
        diff = max(diff, float((x.topk_logprobs[:, 0].float() - y.topk_logprobs[:, 0].float()).abs().max()))
    return f"top-1 ids agree at {100 * same / max(total, 1):.1f}% of positions, max |d log-prob| {diff:.2e}"


def format_table(rows: list[dict]) -> str:
    cols = ["path", "samples", "seconds", "tokens/s", "samples/s", "positions/s", "TFLOP/s", "MFU", "GPU busy",
            "busy (loop)", "tail s", "B/position", "hidden B/vis-row", "peak GiB", "warm-up s"]
    fmt = {"seconds": "{:.2f}", "tokens/s": "{:.0f}", "samples/s": "{:.1f}", "positions/s": "{:.0f}",
           "TFLOP/s": "{:.3g}", "MFU": "{:.1%}", "GPU busy": "{:.1%}", "busy (loop)": "{:.1%}", "tail s": "{:.2f}",
           "warm-up s": "{:.1f}",
           "B/position": "{:.0f}", "hidden B/vis-row": "{:.0f}", "peak GiB": "{:.2f}"}
    cells = [[("n/a" if isinstance(r.get(c), float) and np.isnan(r[c]) else
               fmt.get(c, "{}").format(r[c]) if c in r else "n/a") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--teacher", help="a LLaVA directory (loaded like the dump loads it)")
    src.add_argument("--preset", help="tiny-teacher | random:qwen2.5-3b | ... built in memory "
                                      "(default: random:qwen2.5-3b on GPU, tiny-teacher on CPU)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override a preset's vocabulary "
                    "(default: the preset's; 32768 for tiny-*)")
    ap.add_argument("--num-samples", type=int, default=128 if cuda else 16)
    ap.add_argument("--batch-size", type=int, default=16 if cuda else 4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=128, help="prompt + response tokens per sample")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="of which prompt")
    ap.add_argument("--chunk-size", type=int, default=DumpConfig.chunk_size)
    ap.add_argument("--hidden", default="bf16", choices=["bf16", "fp16", "float32", "none"])
    ap.add_argument("--compare-naive", action="store_true", help="also run the full-logits path, then the ratio")
    ap.add_argument("--compile", action="store_true",
                    help="also run kdcache with the teacher torch.compiled (`kdcache dump --compile`; the compile "
                         "happens in the warm-up, outside the timing), last, then its ratio to the others")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                    help="vllm: also run the vLLM backend (needs --teacher DIR and vLLM) and compare")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", default="host", choices=["host", "device"],
                    help="host: batches in host memory as the dump's DataLoader gives them (default); device: "
                         "on the GPU beforehand")
    ap.add_argument("--layers", type=int, default=None,
                    help="a random: preset with this many LLM and vision layers (e.g. 1: the real widths on a CPU)")
    ap.add_argument("--compile-min-s", type=float, default=0.0,
                    help="run the --compile row only if at least this many seconds of the table's budget are "
                         "left (compiling a 3B teacher takes minutes the first time)")
    _report.add_args(ap)
    args = ap.parse_args(argv)
    planned = ["kdcache"] + (["naive"] if args.compare_naive else []) + (["kdcache + compile"] if args.compile else [])
    rep = _report.Report(args, "dump", planned=planned + (["vllm"] if args.backend == "vllm" else []))
    use_vllm = args.backend == "vllm"
    if use_vllm and not args.teacher:
        raise SystemExit("--backend vllm needs --teacher DIR: vLLM loads the weights from a directory")
    if use_vllm:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            print("vLLM is not installed (pip install 'kdcache[vllm]'): skipping the vLLM row", file=sys.stderr)
            use_vllm = False

    device = torch.device(("cuda" if cuda else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.teacher:
        model, processor = load_model(args.teacher, dtype=dtype, device=device)
        model.requires_grad_(False).eval()
        name = args.teacher
    else:
        name = args.preset or ("random:qwen2.5-3b" if device.type == "cuda" else "tiny-teacher")
        t = time.perf_counter()
        model, processor = build_preset(name, args.vocab_size, device, dtype, args.layers), None
        sync(device)
        print(f"built {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        rep.meta(build_s=time.perf_counter() - t)
    n_image = num_image_tokens(model.config, processor)
    V, D = model.lm_head.weight.shape
    where = torch.device("cpu") if args.batches == "host" else device
    batches = synthetic_batches(model, n_image, args.num_samples, args.batch_size, args.text_tokens,
                                args.prompt_tokens, where)
    warmup = synthetic_batches(model, n_image, args.batch_size, args.batch_size, args.text_tokens,
                               args.prompt_tokens, where, seed=1)[0]
    T = batches[0]["input_ids"].shape[1]
    if use_vllm:
        images = use_pil_images(batches, processor, device, model.dtype)
        use_pil_images([warmup], processor, device, model.dtype, seed=3)
    cfg = DumpConfig(teacher=name, data="synthetic", images="synthetic", out="bench", top_k=args.top_k,
                     positions=KINDS, hidden=args.hidden, chunk_size=args.chunk_size)
    attrs = make_attrs(
        {"name_or_path": name, "config_hash": config_hash(model.config), "vocab_size": int(V),
         "hidden_size": int(D), "dtype": str(dtype).replace("torch.", ""), "num_image_tokens": n_image},
        {"name_or_path": name, "vocab_hash": "synthetic", "template": "none", "template_hash": "none"},
        {"path": "synthetic", "num_rows": args.num_samples, "content_hash": "synthetic-ids-seed0"},
        dump_settings(cfg, 1))
    hidden = args.hidden != "none"

    def ours(model, batch, **kw):
        return teacher_records(model, batch, chunk_size=args.chunk_size, **kw)

    head = (f"{name}{f' ({args.layers} layers)' if args.layers else ''} on {device} "
            f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {dtype}): vocab {V}, hidden {D}, "
            f"{n_image} visual + {args.text_tokens} text = {T} tokens/sample, batch {args.batch_size}, "
            f"{args.num_samples} samples, top-{args.top_k}, hidden {args.hidden}, batches in {args.batches} memory, "
            f"torch {torch.__version__}")
    print(head)
    peak = matmul_peak(device, dtype)
    print(f"measured matmul peak ({dtype}): {peak / 1e12:.3g} TFLOP/s (the MFU denominator)")
    rep.meta(model=name, layers=args.layers, device=str(device), dtype=str(dtype), vocab=int(V), hidden=int(D),
             visual=n_image, tokens=T, batch=args.batch_size, samples=args.num_samples, top_k=args.top_k,
             matmul_peak_flops=peak, head=head)
    rows, checks = [], {}

    def add(row):
        rows.append(row)
        rep.row(row)
        render(rep, rows, checks, head, peak, dtype, device, args)

    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        add(run_path("kdcache", ours, model, batches, warmup, Path(tmp) / "ours.zarr", attrs, device,
                     args.top_k, hidden, peak, rep=rep))
        n_done = rows[0]["samples"] // args.batch_size  # later rows: the same batches, side by side
        if args.compare_naive:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # the naive path costs about twice the kdcache one: start it only if that fits
            if rep.fits(2 * rows[0]["seconds"] + rows[0]["warm-up s"] + 2):
                add(run_path("naive", naive_records, model, batches[:n_done], warmup, Path(tmp) / "naive.zarr",
                             attrs, device, args.top_k, hidden, peak, write_thread=False, rep=rep))
                checks["naive"] = agreement(Path(tmp) / "ours.zarr", Path(tmp) / "naive.zarr")
                render(rep, rows, checks, head, peak, dtype, device, args)
            else:
                rep.skip("naive", f"table budget: {rep.left():.0f} s left")
        if args.compile and not rep.fits(max(args.compile_min_s, 2 * rows[0]["seconds"])):
            rep.skip("kdcache + compile", f"table budget: {rep.left():.0f} s left, the compile row wants "
                                          f">= {args.compile_min_s:.0f} s")
        elif args.compile:
            from kdcache.dump import compile_teacher

            compile_teacher(model)  # in place: every row after this one runs compiled
            t = time.perf_counter()
            rep.doing(f"compiling the teacher (torch.compile, first batch) with {rep.left():.0f} s of the budget left")
            ours(model, warmup, kinds=KINDS, top_k=args.top_k, with_hidden=hidden)  # the compile itself
            sync(device)
            compile_s = time.perf_counter() - t
            rep.note(f"compiled the teacher in {compile_s:.1f} s (first batch)")
            row = run_path("kdcache + compile", ours, model, batches[:n_done], warmup, Path(tmp) / "compiled.zarr",
                           attrs, device, args.top_k, hidden, peak, rep=rep)
            row["compile s"] = compile_s
            checks["kdcache + compile"] = agreement(Path(tmp) / "ours.zarr", Path(tmp) / "compiled.zarr")
            add(row)
        if use_vllm:
            import dataclasses

            v_attrs = make_attrs(attrs["teacher"], attrs["tokenizer"], attrs["dataset"],
                                 dump_settings(dataclasses.replace(cfg, hidden="none", backend="vllm"), 1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row = run_vllm(args.teacher, batches, images, 0, Path(tmp) / "vllm.zarr", v_attrs, args.top_k, int(V))
            checks["vllm"] = agreement(Path(tmp) / "ours.zarr", Path(tmp) / "vllm.zarr")
            add(row)
    print("\n" + rep.data["markdown"] + "\n" + "\n".join(rep.data["summary"]))
    rep.finish()
    return 0


def render(rep, rows, checks, head, peak, dtype, device, args) -> None:
    """The markdown table, the ratios between its rows and the targets (rewritten after each row)."""
    by_path = {r["path"]: r for r in rows}
    lines, summary = [], []
    a = by_path.get("kdcache")
    if a and "naive" in by_path:
        b = by_path["naive"]
        mem = (f"; peak memory {a['peak GiB']:.2f} vs {b['peak GiB']:.2f} GiB ({b['peak GiB'] / a['peak GiB']:.2f}x)"
               if device.type == "cuda" else "")
        x = a["tokens/s"] / b["tokens/s"]
        lines.append(f"kdcache / naive: {x:.2f}x tokens/s{mem}; {checks.get('naive', '')}")
        summary.append(f"dump kdcache / naive: {x:.2f}x tokens/s (>= 1.4: {_report.verdict(x >= 1.4)}); "
                       f"MFU {a['MFU']:.1%} vs {b['MFU']:.1%}")
    if a and device.type == "cuda":
        summary.append(f"dump GPU busy (CUDA events): {a['GPU busy']:.1%} of the wall time, {a['busy (loop)']:.1%} "
                       f"of the loop without the final {a['tail s']:.2f} s drain (>= 95%: "
                       f"{_report.verdict(a['GPU busy'] >= 0.95)} / {_report.verdict(a['busy (loop)'] >= 0.95)})")
    c = by_path.get("kdcache + compile")
    if c and a:
        vs_naive = f", {c['tokens/s'] / by_path['naive']['tokens/s']:.2f}x naive" if "naive" in by_path else ""
        lines.append(f"kdcache + compile / kdcache: {c['tokens/s'] / a['tokens/s']:.2f}x tokens/s{vs_naive} "
                     f"(compile {c.get('compile s', float('nan')):.0f} s); {checks.get('kdcache + compile', '')}")
        summary.append(lines[-1].split(";")[0])
    v = by_path.get("vllm")
    if v and a:
        lines.append(f"kdcache (hf) / vllm: {a['tokens/s'] / v['tokens/s']:.2f}x tokens/s; {checks.get('vllm', '')}")
    skipped = [f"{k}: not run ({why})" for k, why in rep.data["skipped"].items()]
    md = (head + f"\nmatmul peak ({dtype}, measured): {peak / 1e12:.3g} TFLOP/s\n\n" + format_table(rows) + "\n\n"
          + "\n".join(lines + skipped))
    rep.render(md, summary)


if __name__ == "__main__":
    sys.exit(main())
