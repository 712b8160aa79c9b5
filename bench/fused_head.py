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

from kdcache import losses as L

SHAPES = {  # name: (positions N, of which response, D, V)
    "reduced": (4 * 176, 4 * 24, 256, 8192),
    "real": (8 * 857, 8 * 96, 896, 151936),
}


def make_inputs(N, n_resp, D, V, k, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(device)
    W = (torch.randn(V, D, generator=g) * D ** -0.5).to(device)
    # A teacher whose distributions are peaked like a real one's: random logits, scale 4.
    lp = torch.empty(N, k, device=device)
    ids = torch.empty(N, k, dtype=torch.long, device=device)
    tail = torch.empty(N, device=device)
    for s in range(0, N, 1024):  # never a [N, V] teacher tensor at once
        zt = torch.randn(min(1024, N - s), V, generator=g).to(device) * 4
        lpt = zt.log_softmax(-1)
        v, i = lpt.topk(k, -1)
        lp[s:s + len(v)], ids[s:s + len(v)] = v, i
        tail[s:s + len(v)] = torch.logsumexp(lpt.scatter(-1, i, float("-inf")), -1)
    labels = torch.full((N,), -100, dtype=torch.long)
    labels[N - n_resp:] = torch.randint(0, V, (n_resp,), generator=g)
    visual = torch.zeros(N, dtype=torch.bool)
    visual[:N - n_resp] = True
    return hidden, W, labels.to(device), visual.to(device), ids, lp.half(), tail


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--shapes", default="auto", choices=["auto", "reduced", "real"],
                    help="auto: real on CUDA, reduced on CPU")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk (the trainer's loss.chunk_size)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 CUDA, 7 CPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    shapes = args.shapes if args.shapes != "auto" else ("real" if cuda else "reduced")
    N, n_resp, D, V = SHAPES[shapes]
    repeats = args.repeats or (10 if cuda else 7)
    inputs = make_inputs(N, n_resp, D, V, args.top_k, device)
    h0, W0 = inputs[0], inputs[1]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def once(fn):
        h, W = h0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = fn(h, W, *inputs[2:], args.chunk_size)
        loss.backward()
        return loss.detach().float(), h.grad, W.grad

    results, times, peaks = {}, {name: [] for name in ROWS}, {}
    for name, fn in ROWS.items():  # warm-up, values for the check, and the memory peak
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        results[name] = once(fn)
        sync()
        if cuda:
            peaks[name] = torch.cuda.max_memory_allocated() - base
    for _ in range(repeats):
        for name, fn in ROWS.items():
            sync()
            t0 = time.perf_counter()
            once(fn)
            sync()
            times[name].append(time.perf_counter() - t0)

    ref = results["plain (full logits)"]
    print(f"\ndevice {device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), shapes {shapes}: N = {N} positions "
          f"({N - n_resp} visual, {n_resp} response), D = {D}, V = {V}, k = {args.top_k}, chunk {args.chunk_size}, "
          f"{'bf16 autocast' if cuda else 'fp32'}, median of {repeats} rounds")
    print(f"{'head (forward + backward)':<28} {'ms':>9} {'x plain':>8} {'peak above start (GiB)':>23} "
          f"{'loss rel err':>13} {'grad h rel err':>15} {'grad W rel err':>15}")
    t_ref = statistics.median(times["plain (full logits)"])
    for name in ROWS:
        t = statistics.median(times[name])
        errs = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(results[name], ref)]
        peak = f"{peaks[name] / 2**30:.2f}" if cuda else "n/a"
        print(f"{name:<28} {t * 1e3:>9.1f} {t / t_ref:>8.2f} {peak:>23} {errs[0]:>13.1e} {errs[1]:>15.1e} "
              f"{errs[2]:>15.1e}")


if __name__ == "__main__":
    main()
