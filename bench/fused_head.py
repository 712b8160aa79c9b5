"""Benchmark the student's LM head + losses alone: plain vs fused (recomputing) vs fused (grads in forward).

    python bench/fused_head.py                  # CPU: reduced shapes, ~20 s
    python bench/fused_head.py --shapes real    # GPU: one DFT micro-batch of Qwen2.5-0.5B,
                                                # 8 x (729 + 128) positions, D = 896, V = 151936

What a cached-KD step adds to SFT is this head: the LM head at every distilled position, the
log-softmax, the top-k + tail divergence and their backward. Rows, all on the same tensors, each
a forward + backward of L = mean CE(response) + mean KL(visual) + mean KL(response):

- ``plain``            logits = hidden @ W^T over all positions ([N, V], autocast dtype), then
                       ``token_cross_entropy`` and ``topk_divergence`` in float32, autograd
- ``fused, recompute`` ``fused_lm_losses`` (per-position outputs; its backward recomputes each
                       chunk's logits: the logit product runs twice, four products per chunk in all)
- ``fused, grads in forward`` ``fused_lm_loss`` with the per-position weights known up front (the
                       trainer's path: the logits once, values and dz from them, three
                       products per chunk in all)

Each row is checked against ``plain`` (loss, grad hidden, grad W: max |diff| / max |ref|), so
the GPU run repeats the CPU tests' equality at the real shapes. Times are medians over
``--repeats`` rounds, the rows interleaved within each round so machine noise hits all alike.
Memory (CUDA): peak allocated above what was held before the row (inputs, W, the teacher's
targets).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import _report
from kdcache import losses as L

SHAPES = {  # name: (positions N, of which response, D, V)
    "reduced": (4 * 176, 4 * 24, 256, 8192),
    "real": (8 * 857, 8 * 96, 896, 151936),
    # the real widths and vocabulary for one sample: a CPU check of the real-shape code path
    "real-thin": (857, 96, 896, 151936),
}


def make_inputs(N, n_resp, D, V, k, device, seed=0):
    """Hidden states, W, labels, the visual mask and top-k targets, drawn on ``device`` (a GPU
    draws the [N, V] teacher logits in milliseconds; the CPU's generator gives the same numbers
    on the CPU as before)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, device=device)
    W = torch.randn(V, D, generator=g, device=device) * D ** -0.5
    # A teacher whose distributions are peaked like a real one's: random logits, scale 4.
    lp = torch.empty(N, k, device=device)
    ids = torch.empty(N, k, dtype=torch.long, device=device)
    tail = torch.empty(N, device=device)
    for s in range(0, N, 1024):  # never a [N, V] teacher tensor at once
        zt = torch.randn(min(1024, N - s), V, generator=g, device=device) * 4
        lpt = zt.log_softmax(-1)
        v, i = lpt.topk(k, -1)
        lp[s:s + len(v)], ids[s:s + len(v)] = v, i
        tail[s:s + len(v)] = torch.logsumexp(lpt.scatter(-1, i, float("-inf")), -1)
    labels = torch.full((N,), -100, dtype=torch.long, device=device)
    labels[N - n_resp:] = torch.randint(0, V, (n_resp,), generator=g, device=device)
    visual = torch.zeros(N, dtype=torch.bool, device=device)
    visual[:N - n_resp] = True
    return hidden, W, labels, visual, ids, lp.half(), tail


def weights(labels, visual):
    ce_valid = labels != -100
    w_ce = ce_valid / ce_valid.sum().clamp(min=1)
    w_kd = visual / visual.sum().clamp(min=1) + ~visual / (~visual).sum().clamp(min=1)
    return w_ce, w_kd


def run_plain(h, W, labels, visual, ids, lp, tail, chunk):
    z = h @ W.T  # [N, V] in the autocast dtype: what student(...).logits holds
    w_ce, w_kd = weights(labels, visual)
    ce = L.token_cross_entropy(z.float(), labels)
    kd = L.topk_divergence(z.float(), ids, lp.float(), tail)
    return (w_ce * ce).sum() + (w_kd * kd).sum()


def run_recompute(h, W, labels, visual, ids, lp, tail, chunk):
    w_ce, w_kd = weights(labels, visual)
    ce, kd = L.fused_lm_losses(h, W, labels=labels, topk_ids=ids, topk_logprobs=lp.float(), tail_logmass=tail,
                               chunk_size=chunk)
    return (w_ce * ce).sum() + (w_kd * kd).sum()


def run_forward_grads(h, W, labels, visual, ids, lp, tail, chunk):
    w_ce, w_kd = weights(labels, visual)
    loss, _, _ = L.fused_lm_loss(h, W, ce_weight=w_ce, kd_weight=w_kd, labels=labels, topk_ids=ids,
                                 topk_logprobs=lp.float(), tail_logmass=tail, chunk_size=chunk)
    return loss


ROWS = {"plain (full logits)": run_plain, "fused, recompute": run_recompute,
        "fused, grads in forward": run_forward_grads}


def rel_errors(a, ref) -> list[float]:
    """max |a - ref| / max |ref| for the loss, grad hidden and grad W."""
    return [(x - y).abs().max().item() / max(y.abs().max().item(), 1e-30) for x, y in zip(a, ref)]


EQUAL_TOL = 1e-4  # float32 relative error under which a row counts as equal to plain


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--shapes", default="auto", choices=["auto", *SHAPES],
                    help="auto: real on CUDA, reduced on CPU; real-thin: the real widths, one sample")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk (the trainer's loss.chunk_size)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 CUDA, 7 CPU)")
    _report.add_args(ap)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    shapes = args.shapes if args.shapes != "auto" else ("real" if cuda else "reduced")
    N, n_resp, D, V = SHAPES[shapes]
    repeats = args.repeats or (10 if cuda else 7)
    rep = _report.Report(args, "fused_head", planned=list(ROWS))
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 check means float32
    inputs = make_inputs(N, n_resp, D, V, args.top_k, device)
    h0, W0 = inputs[0], inputs[1]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rep.meta(device=str(device), gpu=torch.cuda.get_device_name() if cuda else "CPU", shapes=shapes, N=N,
             visual=N - n_resp, response=n_resp, D=D, V=V, k=args.top_k, chunk=args.chunk_size,
             dtype="bf16 autocast" if cuda else "fp32", repeats=repeats, equal_tol=EQUAL_TOL)

    def once(fn, autocast):
        h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, W, *inputs[2:], args.chunk_size)
        loss.backward()
        return loss.detach().float(), h.grad, W.grad

    # Equality first, in float32 (no autocast): the check of the CPU tests at these shapes.
    rep.doing("the float32 equality check")
    results, times, peaks, done = {}, {name: [] for name in ROWS}, {}, []
    t = time.perf_counter()
    ref32 = once(ROWS["plain (full logits)"], False)
    err32 = {"plain (full logits)": [0.0, 0.0, 0.0]}
    for name, fn in ROWS.items():
        if name != "plain (full logits)":
            err32[name] = rel_errors(once(fn, False), ref32)
            render(rep, err32, results, times, peaks, done, cuda, device, shapes, N, n_resp, D, V, args)
    del ref32
    sync()
    check_s = time.perf_counter() - t

    for name, fn in ROWS.items():  # warm-up in the timed dtype, values for its errors, and the memory peak
        if not rep.fits(2 * check_s / len(ROWS)):
            rep.skip(name, f"table budget: {rep.left():.0f} s left")
            continue
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rep.doing(f"{name}: warm-up")
        results[name] = once(fn, cuda)
        sync()
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated() - base
        done.append(name)
    render(rep, err32, results, times, peaks, done, cuda, device, shapes, N, n_resp, D, V, args)
    rep.doing("timed rounds")
    t_round = None
    for i in range(repeats):
        if t_round is not None and not rep.fits(1.5 * t_round):
            rep.note(f"stopped after {i} of {repeats} timed rounds: table budget")
            break
        t_r = time.perf_counter()
        for name in done:
            sync()
            t0 = time.perf_counter()
            once(ROWS[name], cuda)
            sync()
            times[name].append(time.perf_counter() - t0)
        t_round = time.perf_counter() - t_r

    render(rep, err32, results, times, peaks, done, cuda, device, shapes, N, n_resp, D, V, args)
    print("\n" + rep.data["markdown"] + "\n" + "\n".join(rep.data["summary"]))
    rep.finish()


def render(rep, err32, results, times, peaks, done, cuda, device, shapes, N, n_resp, D, V, args) -> None:
    """The markdown table and target lines from what is measured so far: rows that have
    only their float32 check show it, their timing marked as not measured."""
    ref = results.get("plain (full logits)")
    rounds = min((len(times[n]) for n in done), default=0)
    head = (f"device {device} ({rep.data['meta']['gpu']}), shapes {shapes}: N = {N} positions "
            f"({N - n_resp} visual, {n_resp} response), D = {D}, V = {V}, k = {args.top_k}, chunk {args.chunk_size}, "
            f"timed in {'bf16 autocast' if cuda else 'fp32'}, median of {rounds} rounds; "
            f"equality checked in fp32 (TF32 off)")
    t_ref = statistics.median(times["plain (full logits)"]) if times["plain (full logits)"] else None
    table, summary, cells_all = [], [], []
    for name in ROWS:
        t = statistics.median(times[name]) if times[name] else None
        e = rel_errors(results[name], ref) if name in results and ref is not None else [None] * 3
        e32 = err32.get(name, [None] * 3)
        row = {"row": name, "ms": None if t is None else t * 1e3, "x_plain": t / t_ref if t and t_ref else None,
               "peak_above_start_GiB": peaks[name] / 2**30 if name in peaks else None,
               "rel_err_fp32": dict(zip(("loss", "grad_h", "grad_W"), e32)),
               "rel_err_timed": dict(zip(("loss", "grad_h", "grad_W"), e)), "rounds": len(times[name])}
        table.append(row)
        cells = [name, _report.fmt(row["ms"], "{:.1f}", "not run"), _report.fmt(row["x_plain"]),
                 _report.fmt(row["peak_above_start_GiB"])]
        cells += [_report.fmt(x, "{:.1e}") for x in e32] + [_report.fmt(x, "{:.1e}") for x in e]
        cells_all.append(cells)
    rep.data["rows"] = table
    md = _report.md_table(["head (fwd + bwd)", "ms", "x plain", "peak above start GiB", "fp32 err loss",
                           "fp32 err grad h", "fp32 err grad W", "timed err loss", "timed err grad h",
                           "timed err grad W"], cells_all)
    checked = [max(v) for v in err32.values() if None not in v]
    if checked:
        worst = max(checked)
        ok = worst <= EQUAL_TOL and len(checked) == len(ROWS)
        summary.append(f"fused_head equality at V = {V} (fp32, max rel err of loss and both grads, "
                       f"{len(checked)} of {len(ROWS)} rows): {worst:.1e} (<= {EQUAL_TOL:g}: {_report.verdict(ok)})")
    fw = next((r for r in table if r["row"] == "fused, grads in forward"), None)
    if fw and fw["x_plain"]:
        summary.append(f"fused_head time: grads in forward {fw['x_plain']:.2f}x plain")
    rep.render(head + "\n\n" + md, summary)


if __name__ == "__main__":
    main()
