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
                     float16 log-probs, float32 tail, bf16 visual hidden states) delivered as
                     the trainer receives them each step: packed, pinned, copied non-blocking
                     (``to_device``) and unpacked: L_reg + L_res + L_vis + 0.5 L_rel, fused LM head.
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

The batch's tensors are pinned on CUDA, as the trainer's DataLoader pins them.

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

import _report
from kdcache import losses as L
from kdcache.config import LossConfig, TrainConfig
from kdcache.models import QWEN_SHAPES, SIGLIP_SO400M, llava_config
from kdcache.positions import ROLE_PROMPT, ROLE_RESPONSE, ROLE_VISUAL
from kdcache.records import TeacherRecord
from kdcache.target_kinds import parse_targets
from kdcache.teacher import teacher_records
from kdcache.train import TeacherSide, _set_trainable, batch_losses, pack_records, relation_term, to_device

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
    # the real widths, vocabulary and image size with one layer per model and batch 2: a CPU check
    # of the real-shape code path (729 visual tokens, V = 151936), not a timing
    "real-thin": (_llm_shape("qwen2.5-0.5b") | {"num_hidden_layers": 1},
                  _llm_shape("qwen2.5-3b") | {"num_hidden_layers": 1},
                  dict(SIGLIP_SO400M) | {"num_hidden_layers": 2}, 2, 128,
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


def as_delivered(records: list[TeacherRecord], device: torch.device):
    """What the trainer does with a batch's cache records each step: the loader hands them over
    packed (one tensor per field) in pinned memory and ``to_device`` copies them non-blocking; the
    losses read the packed fields. -> a function giving the step's packed records."""
    packed = pack_records(records)
    if device.type == "cuda":
        packed = {k: (v.pin_memory() if k in packed["fields"] else v) for k, v in packed.items()}
    return lambda: to_device(packed, device)


def pinned(batch: dict, device: torch.device) -> dict:
    """The batch's tensors in pinned memory on CUDA, as the trainer's DataLoader (pin_memory) gives them."""
    if device.type != "cuda":
        return batch
    return {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


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
             "rel": relation_term(hidden, batch, pack_records(records), student.lm_head.weight, teacher_gram, cfg)}
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


def run(name, step_fn, device, steps, warmup, rep=None):
    """Warm-up, then up to ``steps`` timed steps (fewer when the report's deadline is near:
    at least one) -> the row: median time, peaks."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_w = time.perf_counter()
    for _ in range(warmup):
        step_fn()
    sync()
    t_w = (time.perf_counter() - t_w) / max(warmup, 1)
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
        if times and rep is not None and not rep.fits(1.5 * max(times) + 1.0):
            break
        t0 = time.perf_counter()
        step_fn()
        sync()
        times.append(time.perf_counter() - t0)
    reserved = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        mem = (peak, peak - base)
    elif cpu_ok:
        hwm = rss_kib()[1] * 1024
        mem = (hwm, hwm - base)
    else:
        mem = (None, None)
    return {"name": name, "time": statistics.median(times), "peak": mem[0], "extra": mem[1],
            "peak_reserved": reserved, "steps": len(times), "warmup_s": t_w}


SFT_ROW, PLAIN_ROW, CACHED_ROW = "SFT (L_reg, kdcache)", "SFT, plain transformers (full logits)", "cached KD"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--shapes", default="auto", choices=["auto", *SHAPES],
                    help="auto: real on CUDA, reduced on CPU; real-thin: real widths, one layer (a CPU check)")
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
    ap.add_argument("--card-gib", type=float, default=24.0,
                    help="with --gradient-checkpointing: the card the peak is checked against")
    _report.add_args(ap)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    shapes = args.shapes if args.shapes != "auto" else ("real" if cuda else "reduced")
    s_llm, t_llm, vision, B, n_text, V = SHAPES[shapes]
    B = args.batch_size or B
    n_text = args.text_tokens or n_text
    steps = args.steps or (10 if cuda else 5)
    autocast = cuda
    t_dtype = torch.bfloat16 if cuda else torch.float32
    gc_mode = args.gradient_checkpointing
    table = "train_gc" if gc_mode else "train_step"
    online_planned = [] if args.skip_online else ["online KD"]
    rep = _report.Report(args, table, planned=[SFT_ROW, PLAIN_ROW, CACHED_ROW, "cached KD, exact", *online_planned,
                                               "naive cached KD"])

    t = time.perf_counter()
    rep.doing("building the models")
    student, n_vis = build(s_llm, vision, V, device, torch.float32)  # fp32 master weights, as the trainer
    _set_trainable(student, "dft")
    if gc_mode:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    teacher, _ = build(t_llm, vision, V, device, t_dtype)
    teacher.requires_grad_(False).eval()
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    batch = pinned(make_batch(B, n_vis, n_text, V, vision["image_size"]), device)
    T = batch["input_ids"].shape[1]
    t = time.perf_counter()
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
                             temperature=1.0, targets=parse_targets("hidden"))
    gram = (W_t.T @ W_t).cpu()  # the cache's M_t, on the host like the reader's
    side = TeacherSide(gram=gram.to(device), lm_head=None, temperature=1.0, targets=parse_targets("topk"))
    del W_t
    online_k = V if args.online_k == 0 else (args.online_k or args.top_k)
    if args.skip_online:
        teacher = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    records_s = time.perf_counter() - t
    context = None
    if cuda:  # what the process holds on the card beyond the allocator's pool: CUDA context, cuBLAS workspace
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
    n_params = sum(p.numel() for p in student.parameters())
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    rep.meta(device=str(device), gpu=torch.cuda.get_device_name() if cuda else "CPU", shapes=shapes, batch=B,
             tokens=T, visual=n_vis, V=V, student_llm=s_llm, teacher_llm=t_llm, vision=vision,
             dtype="bf16 autocast" if autocast else "fp32", gradient_checkpointing=gc_mode,
             student_params=n_params, trainable_params=n_train, build_s=build_s, records_s=records_s,
             context_bytes=context, steps=steps, warmup=args.warmup)

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

    def online():
        recs = teacher_records(teacher, batch, kinds=("visual", "response"), top_k=online_k, with_hidden=True)
        return batch_losses(student, batch, pack_records(recs), side, dft)

    plan = [(SFT_ROW, "SFT (L_reg, kdcache)", lambda: batch_losses(student, batch, None, None, sft), 1.0),
            (PLAIN_ROW, PLAIN_ROW, lambda: plain_sft_losses(student, batch), 1.2),
            (CACHED_ROW, f"cached KD, k={args.top_k} (kdcache)",
             lambda: batch_losses(student, batch, delivered(), side, dft), 1.3),
            ("cached KD, exact", "cached KD, exact (targets hidden)",
             lambda: batch_losses(student, batch, delivered_exact(), side_exact, dft), 1.6)]
    if teacher is not None:
        plan.append(("online KD", f"online KD, k={'V' if online_k == V else online_k} (teacher in memory)", online,
                     3.0))
    plan.append(("naive cached KD", f"naive cached KD, k={args.top_k} (full logits)",
                 lambda: naive_losses(student, batch, delivered(), gram, dft), 1.6))

    delivered, delivered_exact = as_delivered(cached, device), as_delivered(exact_cached, device)
    rows = []
    t_sft = None  # the SFT step's time: the unit of the other rows' estimates
    for key, name, fn, cost in plan:
        need = (t_sft or 0.0) * cost * (args.warmup + 1) * 1.3 + 1.0  # warm-up + at least one timed step
        if not rep.fits(need):
            rep.skip(key, f"table budget: {rep.left():.0f} s left, ~{need:.0f} s needed")
            continue
        rep.doing(name)
        r = run(name, step(fn), device, steps, args.warmup, rep)
        r["key"] = key
        rows.append(r)
        if key == SFT_ROW:
            t_sft = r["time"]
        rep.row({k: v for k, v in r.items()})
        render(rep, rows, plan, device, shapes, B, T, n_vis, V, s_llm, t_llm, args, context)
    render(rep, rows, plan, device, shapes, B, T, n_vis, V, s_llm, t_llm, args, context)  # the skips too
    print("\n" + rep.data["markdown"] + "\n" + "\n".join(rep.data["summary"]))
    rep.finish()


def render(rep, rows, plan, device, shapes, B, T, n_vis, V, s_llm, t_llm, args, context):
    """The markdown table and the target lines from the rows so far (rewritten after each row)."""
    cuda = device.type == "cuda"
    by = {r["key"]: r for r in rows}
    ref, plain = by.get(SFT_ROW), by.get(PLAIN_ROW)
    gib = lambda x: None if x is None else x / 2**30  # noqa: E731
    head = (f"device {device} ({rep.data['meta']['gpu']}), shapes {shapes}: batch {B} x {T} tokens ({n_vis} visual), "
            f"V = {V}, student LLM {s_llm['hidden_size']}x{s_llm['num_hidden_layers']}, teacher LLM "
            f"{t_llm['hidden_size']}x{t_llm['num_hidden_layers']}, {'bf16 autocast' if cuda else 'fp32'}, "
            f"median of up to {args.steps or rep.data['meta']['steps']} steps after {args.warmup} warm-up"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    mem = "peak alloc GiB" if cuda else "peak RSS GiB"
    cells = []
    for key, name, _fn, _c in plan:
        r = by.get(key)
        if r is None:
            why = rep.data["skipped"].get(key, "not reached yet")
            cells.append([name, "not run", why.split(":")[0], "", "", "", "", "", "", ""])
            continue
        ratio = lambda a, b: None if a is None or b is None or not cuda else a / b  # noqa: E731
        cells.append([name, _report.fmt(r["time"] * 1e3, "{:.1f}"),
                      _report.fmt(r["time"] / ref["time"]) if ref else "n/a",
                      _report.fmt(r["time"] / plain["time"]) if plain else "n/a",
                      _report.fmt(gib(r["peak"])), _report.fmt(gib(r["peak_reserved"])),
                      _report.fmt(gib(r["extra"]), "{:.3f}"),
                      _report.fmt(ratio(r["peak"], ref and ref["peak"])),
                      _report.fmt(ratio(r["peak"], plain and plain["peak"])), str(r["steps"])])
    md = _report.md_table(["step", "ms/step", "x SFT", "x plain", mem, "peak reserved GiB", "above start GiB",
                           "peak x SFT", "peak x plain", "steps"], cells)
    summary = []
    c = by.get(CACHED_ROW)
    if c is not None and not args.gradient_checkpointing:
        for label, base in (("kdcache SFT", ref), ("plain SFT", plain)):
            if base is None:
                continue
            tx = c["time"] / base["time"]
            mx = c["peak"] / base["peak"] if cuda else None
            summary.append(f"train_step cached KD vs {label}: {tx:.2f}x time (<= 1.15: {_report.verdict(tx <= 1.15)}), "
                           + (f"{mx:.2f}x peak (<= 1.10: {_report.verdict(mx <= 1.10)})" if mx is not None
                              else "peak n/a on CPU"))
    if args.gradient_checkpointing and rows:
        worst = max(rows, key=lambda r: r["peak_reserved"] or r["peak"] or 0)
        if cuda:
            need = worst["peak_reserved"] + (context or 0)
            summary.append(f"train_gc batch {B} x {T}: worst peak {gib(worst['peak']):.2f} GiB allocated, "
                           f"{gib(worst['peak_reserved']):.2f} GiB reserved + {gib(context or 0):.2f} GiB CUDA context "
                           f"= {gib(need):.2f} GiB ({worst['name']}; <= {args.card_gib:g} GiB: "
                           f"{_report.verdict(need <= args.card_gib * 2**30)})")
        else:
            summary.append("train_gc: peaks are GPU numbers (n/a on CPU)")
    rep.render(head + "\n\n" + md + "\n\ndesign section 5 (H100, real shapes): SFT 1.0x; naive cached KD 1.39x "
               "time, +14 GiB; online KD 2.44x", summary)


if __name__ == "__main__":
    main()
