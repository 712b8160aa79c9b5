"""Benchmark one student optimizer step: SFT vs cached KD vs online KD vs naive cached KD.

    python bench/train_step.py                      # CPU: reduced shapes, ~30-60 s
    python bench/train_step.py --shapes real        # GPU: SigLIP-so400m + Qwen2.5-0.5B student,
                                                    # Qwen2.5-3B teacher, batch 8 x (729 + 128) tokens

Rows, all at the same batch, each a full step (forward, backward, AdamW) of the student with the
projector + LLM trainable (the DFT stage), on batches already in memory:

- ``SFT``            ``kdcache.train.batch_losses`` with no records: L_reg only, the fused head
                     on the response positions (what ``kdcache train --stage sft`` runs).
- ``SFT, plain``     ``student(..., labels=labels).loss``: plain transformers, [B, T, V] logits at
                     every position and its cross-entropy (the design's "SFT 1.0x" baseline).
- ``cached KD``      the trainer's ``batch_losses`` with cache-like records (top-k int32 ids,
                     float16 log-probs, float32 tail, bf16 visual hidden states, on the host as
                     the reader yields them): L_reg + L_res + L_vis + 0.5 L_rel, fused LM head.
- ``cached KD, exact`` ``targets: hidden``: the teacher's bf16 hidden states at every distilled
                     position + its LM head; the full teacher distribution is rebuilt per chunk
                     inside the fused loss (one extra [c, D_t] x [D_t, V] matmul per chunk).
- ``online KD``      the teacher in memory: ``teacher_records`` (top-k + tail) on the batch
                     every step, then the same losses (``--online-k``, default the cached k; the
                     trainer's own online mode uses k = V, the exactness reference: ``--online-k 0``).
- ``naive cached``   ``student(...).logits`` over every position ([B, T, V]), then
                     ``topk_divergence`` / cross-entropy on the gathered rows and the same
                     relation term: what a straightforward implementation does.

Both SFT rows are references: ``x SFT`` divides by the trainer's own SFT step (the stricter
one: its LM head sees only the response positions), ``x plain`` by the plain transformers one.
The fused head (``kdcache.losses.fused_lm_loss``) forms its gradients in the forward pass, so
a KD step forms each chunk's logits once (three vocabulary-sized products per chunk); its extra cost over SFT is
the LM head and divergence at the ~85% of positions that are visual.

Time: median of ``--steps`` steps after ``--warmup`` (CUDA synchronised). Memory: on CUDA the
peak of ``torch.cuda.max_memory_allocated`` over the timed steps (total, and above the memory
held before the step: weights, optimizer state, the batch); on CPU the peak resident set size
above the one before the steps (Linux ``VmHWM`` after resetting it via ``/proc/self/clear_refs``),
or n/a where that is not available. Ratios are to the SFT row (memory: CUDA peaks only; on CPU the
allocator keeps the warm-up's pages, so the increase above start is the honest figure and has
no meaningful ratio). The reduced CPU shapes keep the real ones' proportions (LLM body vs LM
head, teacher vs student, visual share of the tokens) but not their absolute costs: attention,
the vision tower and per-call overheads weigh differently, so read their ratios as a sketch.

Design section 5 (H100, plain PyTorch + transformers, sdpa, batch 8 x 857): SFT 1.0x; naive
cached KD 1.39x time, +14 GiB; online KD with the teacher in memory 2.44x.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time

import torch

from kdcache import losses as L
from kdcache.config import LossConfig, TrainConfig
from kdcache.models import QWEN_SHAPES, SIGLIP_SO400M, llava_config
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL
from kdcache.records import TeacherRecord
from kdcache.teacher import teacher_records
from kdcache.train import TeacherSide, _set_trainable, batch_losses, relation_term

def _llm_shape(alias: str) -> dict:
    """The body of a real Qwen2.5 size (kdcache.models.QWEN_SHAPES) without vocab and tying."""
    return {k: v for k, v in QWEN_SHAPES[alias].items() if k not in ("vocab_size", "tie_word_embeddings")}


SHAPES = {
    # name: (student LLM, teacher LLM, vision, batch, text tokens, vocab)
    # CPU-sized, with the real shapes' proportions: LLM body ~2.7x the LM head's parameters
    # (Qwen2.5-0.5B: 358M vs 136M), teacher ~4x the student, ~80% of the tokens visual.
    "reduced": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2),
                dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=2),
                dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     image_size=96, patch_size=8),
                4, 32, 8192),
    "real": (_llm_shape("qwen2.5-0.5b"), _llm_shape("qwen2.5-3b"), dict(SIGLIP_SO400M), 8, 128,
             QWEN_SHAPES["qwen2.5-3b"]["vocab_size"]),
}


def build(llm: dict, vision: dict, vocab: int, device, dtype):
    """Random-init LLaVA (SigLIP + Qwen2) of these shapes, built in memory on ``device``."""
    from transformers import LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    tc = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **llm)
    vc = SiglipVisionConfig(**vision)
    n = (vc.image_size // vc.patch_size) ** 2
    cfg = llava_config(tc, vc, vocab - 1)  # the last id stands for <image>
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model, n


def make_batch(B: int, n_vis: int, n_text: int, vocab: int, image_size: int) -> dict:
    """[prompt 1/4 | image n_vis | prompt | response] token ids as ``collate`` returns them."""
    g = torch.Generator().manual_seed(0)
    pre = max(1, n_text // 8)
    mid = max(1, n_text // 8)
    resp = n_text - pre - mid
    T = pre + n_vis + mid + resp
    ids = torch.randint(0, vocab - 1, (B, T), generator=g)
    ids[:, pre:pre + n_vis] = vocab - 1  # <image>
    roles = torch.full((B, T), ROLE_PROMPT, dtype=torch.uint8)
    roles[:, pre:pre + n_vis] = ROLE_VISUAL
    roles[:, pre + n_vis + mid:] = ROLE_RESPONSE
    labels = torch.where(roles == ROLE_RESPONSE, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "roles": roles,
            "pixel_values": torch.randn(B, 3, image_size, image_size, generator=g),
            "has_image": torch.ones(B, dtype=torch.bool), "sample_ids": [f"s{b}" for b in range(B)],
            "rows": list(range(B))}


def as_cached(recs: list[TeacherRecord]) -> list[TeacherRecord]:
    """Records as the cache reader yields them: host tensors in the cache's storage dtypes."""
    return [TeacherRecord(sample_id=r.sample_id, row=r.row, input_ids=r.input_ids.cpu(), roles=r.roles.cpu(),
                          positions=r.positions.cpu(), kinds=r.kinds.cpu(), topk_ids=r.topk_ids.cpu(),
                          topk_logprobs=r.topk_logprobs.to(torch.float16).cpu(),
                          tail_logmass=r.tail_logmass.float().cpu(),
                          visual_hidden=r.visual_hidden.to(torch.bfloat16).cpu()) for r in recs]


def naive_losses(student, batch, records, teacher_gram, cfg: TrainConfig) -> dict:
    """The straightforward path: the LM head over every position ([B, T, V] logits, as
    ``student(...).logits`` makes them), then CE and ``topk_divergence`` on the gathered rows;
    the relation term is the trainer's (no N x V), so only the logits differ."""
    device = student.device
    hidden = student.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           pixel_values=batch["pixel_values"].to(device, student.dtype),
                           use_cache=False).last_hidden_state  # [B, T, D]
    logits = student.lm_head(hidden).float()  # [B, T, V]
    labels = batch["labels"].to(device)
    ce = L.cross_entropy(logits[:, :-1], labels[:, 1:])
    b_idx = torch.cat([torch.full((len(r.positions),), b, dtype=torch.long) for b, r in enumerate(records)])
    pos = torch.cat([r.positions.long() for r in records])
    kinds = torch.cat([r.kinds for r in records]).to(device)
    z = logits[b_idx.to(device), pos.to(device)]  # [P, V]
    kd = L.topk_divergence(z, torch.cat([r.topk_ids for r in records]).to(device).long(),
                           torch.cat([r.topk_logprobs for r in records]).to(device).float(),
                           torch.cat([r.tail_logmass for r in records]).to(device).float())
    terms = {"reg": ce, "res": L.masked_mean(kd, kinds == 2), "vis": L.masked_mean(kd, kinds == 1),
             "rel": relation_term(hidden, batch, records, student.lm_head.weight, teacher_gram, cfg)}
    terms["total"] = terms["reg"] + terms["res"] + terms["vis"] + 0.5 * terms["rel"]
    return terms


def plain_sft_losses(student, batch) -> dict:
    """SFT as plain transformers runs it: the model's own loss over [B, T, V] logits."""
    device = student.device
    out = student(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  pixel_values=batch["pixel_values"].to(device, student.dtype), labels=batch["labels"].to(device),
                  use_cache=False)
    return {"total": out.loss}


def rss_kib() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of this process in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            d = dict(line.split(":", 1) for line in f)
        return int(d["VmRSS"].split()[0]), int(d["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(name, step_fn, device, steps, warmup):
    for _ in range(warmup):
        step_fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cpu_ok = False
    else:
        cpu_ok = reset_peak_rss() and rss_kib() is not None
        base = rss_kib()[0] * 1024 if cpu_ok else 0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        mem = (peak, peak - base)
    elif cpu_ok:
        hwm = rss_kib()[1] * 1024
        mem = (hwm, hwm - base)
    else:
        mem = (None, None)
    return {"name": name, "time": statistics.median(times), "peak": mem[0], "extra": mem[1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--shapes", default="auto", choices=["auto", "reduced", "real"],
                    help="auto: real on CUDA, reduced on CPU")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--text-tokens", type=int, default=None, help="non-visual tokens per sample")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--online-k", type=int, default=None, help="online KD top-k (default --top-k; 0 = V)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-online", action="store_true", help="no teacher row (saves its memory)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute the student's layer activations in backward (what `gradient_checkpointing: "
                         "true` does in a recipe): e.g. --shapes real --skip-online --gradient-checkpointing "
                         "shows a 0.5B DFT step's peak against a 24 GiB card")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    shapes = args.shapes if args.shapes != "auto" else ("real" if device.type == "cuda" else "reduced")
    s_llm, t_llm, vision, B, n_text, V = SHAPES[shapes]
    B = args.batch_size or B
    n_text = args.text_tokens or n_text
    steps = args.steps or (10 if device.type == "cuda" else 5)
    autocast = device.type == "cuda"
    t_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    student, n_vis = build(s_llm, vision, V, device, torch.float32)  # fp32 master weights, as the trainer
    _set_trainable(student, "dft")
    if args.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    teacher, _ = build(t_llm, vision, V, device, t_dtype)
    teacher.requires_grad_(False).eval()
    batch = make_batch(B, n_vis, n_text, V, vision["image_size"])
    T = batch["input_ids"].shape[1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        recs = teacher_records(teacher, batch, kinds=("visual", "response"), top_k=args.top_k, with_hidden=True)
    cached = as_cached(recs)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        exact_recs = teacher_records(teacher, batch, kinds=("visual", "response"), top_k=8, with_hidden=True,
                                     targets="hidden")
    exact_cached = [dataclasses.replace(c, position_hidden=r.position_hidden.to(torch.bfloat16).cpu())
                    for c, r in zip(as_cached(exact_recs), exact_recs)]
    del recs, exact_recs
    W_t = teacher.lm_head.weight.detach().float()
    # targets: hidden -- the teacher's LM head as the cache stores it (bf16), on the device once
    side_exact = TeacherSide(gram=(W_t.T @ W_t).to(device), lm_head=W_t.to(torch.bfloat16).to(device),
                             temperature=1.0, targets="hidden")
    gram = (W_t.T @ W_t).cpu()  # the cache's M_t, on the host like the reader's
    side = TeacherSide(gram=gram.to(device), lm_head=None, temperature=1.0, targets="topk")
    del W_t
    online_k = V if args.online_k == 0 else (args.online_k or args.top_k)
    if args.skip_online:
        teacher = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    sft = TrainConfig(stage="sft", student="-", data="-", images="-", out="-")
    dft = TrainConfig(stage="dft", student="-", data="-", images="-", out="-", cache="-", loss=LossConfig())
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)

    def step(loss_fn):
        def f():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                terms = loss_fn()
            terms["total"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f

    rows = [run("SFT (L_reg, kdcache)", step(lambda: batch_losses(student, batch, None, None, sft)), device, steps,
                args.warmup),
            run("SFT, plain transformers (full logits)", step(lambda: plain_sft_losses(student, batch)), device,
                steps, args.warmup),
            run(f"cached KD, k={args.top_k} (kdcache)",
                step(lambda: batch_losses(student, batch, cached, side, dft)), device, steps, args.warmup),
            run("cached KD, exact (targets hidden)",
                step(lambda: batch_losses(student, batch, exact_cached, side_exact, dft)), device, steps,
                args.warmup)]
    if teacher is not None:
        def online():
            recs = teacher_records(teacher, batch, kinds=("visual", "response"), top_k=online_k, with_hidden=True)
            return batch_losses(student, batch, recs, side, dft)
        rows.append(run(f"online KD, k={'V' if online_k == V else online_k} (teacher in memory)",
                        step(online), device, steps, args.warmup))
    rows.append(run(f"naive cached KD, k={args.top_k} (full logits)", step(lambda: naive_losses(student, batch, cached, gram, dft)), device, steps, args.warmup))

    print(f"\ndevice {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), shapes {shapes}: "
          f"batch {B} x {T} tokens ({n_vis} visual), V = {V}, student LLM {s_llm['hidden_size']}x"
          f"{s_llm['num_hidden_layers']}, teacher LLM {t_llm['hidden_size']}x{t_llm['num_hidden_layers']}, "
          f"{'bf16 autocast' if autocast else 'fp32'}, median of {steps} steps"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    mem_name = "peak alloc" if device.type == "cuda" else "peak RSS"
    print(f"{'step':<46} {'ms/step':>9} {'x SFT':>6} {'x plain':>7} {mem_name + ' (GiB)':>17} "
          f"{'above start (GiB)':>18} {'peak x SFT':>10} {'x plain':>7}")
    ref, plain = rows[0], rows[1]
    for r in rows:
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.2f}"
        extra = "n/a" if r["extra"] is None else f"{r['extra'] / 2**30:.3f}"
        # On CPU the allocator reuses the warm-up's pages, so SFT's increase is ~0: no ratio there.
        cuda = device.type == "cuda"
        xm = f"{r['peak'] / ref['peak']:.2f}" if cuda else "n/a"
        xmp = f"{r['peak'] / plain['peak']:.2f}" if cuda else "n/a"
        print(f"{r['name']:<46} {r['time'] * 1e3:>9.1f} {r['time'] / ref['time']:>6.2f} "
              f"{r['time'] / plain['time']:>7.2f} {peak:>17} {extra:>18} {xm:>10} {xmp:>7}")
    print("design section 5 (H100, real shapes): SFT 1.0x; naive cached KD 1.39x time, +14 GiB; online KD 2.44x")


if __name__ == "__main__":
    main()
