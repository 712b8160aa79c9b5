"""Cache bytes per position and per sample, measured on a real teacher's cache.

    python bench/cache_size.py --teacher runs/teacher/sft --data data/instruct_small.json \\
        --images data/images [--ks 16,32,64,128] [--limit 200]

For each k and relation mode (``--relation hidden`` with bf16 hidden states, ``lowrank:R`` with
``--rank`` R = 64 in bf16, ``none``) it dumps the first ``--limit`` samples and prints, side by
side: the naive bytes of the top-k (int32 ids + float16 log-probs = 6k bytes per position), what
the cache stores for the same arrays after its codecs, the ratio, the relation data's bytes per
sample on disk (visual_hidden or visual_factor), the relative Gram error of the factor
||R - F F^T||_F / ||R||_F over samples (mean and max, lowrank only), and the whole cache per sample. Log-probs are stored exactly
(float16 rounding only): the max |error| against a float32 dump of the same k is printed with the
KL between the two coarsened distributions. Choose codecs on a trained teacher's cache (the
demo's), not on random weights: trained distributions are peaked and compress differently.

A second table puts the nucleus targets (``--targets topp:P,K`` for each ``--topp`` P, capped at
``--topp-k``) beside top-64: the target arrays' bytes on disk per position (topp: counts, kept
ids and log-probs, tail, and its two index columns), the ids kept per position (mean, p50, p95,
max) and the share of positions the cap cut short.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--ks", default="16,32,64,128")
    ap.add_argument("--limit", type=int, default=200, help="samples to dump (first N of --data)")
    ap.add_argument("--rank", type=int, default=64, help="R of the lowrank:R relation row")
    ap.add_argument("--out", default=None, help="where to keep the caches (default: a temp dir)")
    ap.add_argument("--topp", default="0.99,0.999", help="P of the nucleus rows (empty: none)")
    ap.add_argument("--topp-k", type=int, default=256, help="K, the nucleus rows' cap")
    ap.add_argument("--topp-vs", type=int, default=64, help="the top-k row they are compared with")
    args = ap.parse_args(argv)

    from kdcache.cache.reader import CacheReader
    from kdcache.cache.stats import disk_bytes
    from kdcache.config import DumpConfig
    from kdcache.dump import dump

    work = Path(args.out or tempfile.mkdtemp(prefix="kdcache-size-"))
    data = work / "subset.json"
    data.write_text(json.dumps(json.loads(Path(args.data).read_text())[: args.limit]))
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        ref = work / f"k{k}-f32.zarr"
        dump(DumpConfig(teacher=args.teacher, data=str(data), images=args.images, out=str(ref), top_k=k,
                        logprob_dtype="float32", hidden="none", num_workers=0))
        for relation in ("hidden", f"lowrank:{args.rank}", "none"):
            p = work / f"k{k}-{relation.replace(':', '')}.zarr"
            dump(DumpConfig(teacher=args.teacher, data=str(data), images=args.images, out=str(p), top_k=k,
                            hidden="bf16", relation=relation, num_workers=0))
            r, rr = CacheReader(p), CacheReader(ref)
            P = sum(len(x.positions) for x in r.read_range(0, 0, r.part_sizes[0]))  # one rank: part 0
            b = disk_bytes(p)
            topk = b["topk_ids"] + b["topk_logprobs"] + b["tail_logmass"]
            err, kls = 0.0, []
            for a, c in zip(r.read_range(0, 0, r.part_sizes[0]), rr.read_range(0, 0, rr.part_sizes[0])):
                lp16 = a.topk_logprobs.double().numpy()
                lp32 = c.topk_logprobs.double().numpy()
                err = max(err, float(np.abs(lp16 - lp32).max()))
                t32 = np.concatenate([lp32, c.tail_logmass.double().numpy()[:, None]], 1)
                t16 = np.concatenate([lp16, a.tail_logmass.double().numpy()[:, None]], 1)
                t16 = t16 - np.logaddexp.reduce(t16, axis=1, keepdims=True)
                p32 = np.exp(t32)
                kls.append(np.where(p32 > 0, p32 * (t32 - t16), 0).sum(1))
            S = r.num_samples
            rel = b.get("visual_hidden", 0) + b.get("visual_factor", 0) + b.get("index/relation_error", 0)
            errs = (np.concatenate([part.cols["relation_error"][part.ok] for part in r.parts.values()])
                    if relation.startswith("lowrank:") else np.zeros(0))  # [S] per-sample relative Gram error
            rows.append((k, relation, 6 * k, topk / P, 6 * k / (topk / P), rel / S, errs, sum(b.values()) / S, err,
                         float(np.concatenate(kls).mean())))
    head = (f"{'k':>4} {'relation':>11} {'naive B/pos':>12} {'stored B/pos':>13} {'ratio':>6} {'rel KB/smp':>11}"
            f" {'rel err mean':>13} {'rel err max':>12} {'cache KB/smp':>13} {'max|dlp|':>9} {'KL(f32||f16)':>13}")
    print(head)
    print("-" * len(head))
    for k, rel, naive, stored, ratio, rel_b, errs, tot, err, kl in rows:
        e_mean, e_max = (f"{errs.mean():.2e}", f"{errs.max():.2e}") if errs.size else ("-", "-")
        print(f"{k:>4} {rel:>11} {naive:>12.0f} {stored:>13.1f} {ratio:>6.2f} {rel_b / 1024:>11.2f} {e_mean:>13}"
              f" {e_max:>12} {tot / 1024:>13.1f} {err:>9.2e} {kl:>13.2e}")
    if args.topp:
        topp_table(args, data, work)
    n_vis = r.attrs["teacher"]["num_image_tokens"]
    print(f"\ncaches under {work}; {n_vis} visual tokens per image: relation bytes per sample before compression "
          f"are 2 N D (hidden bf16) and 2 N R (lowrank:R bf16) -- at N = 729, D = 2048: "
          f"{2 * 729 * 2048 / 1e6:.1f} MB vs {2 * 729 * args.rank / 1e3:.0f} KB at R = {args.rank}")


def topp_table(args, data: Path, work: Path) -> None:
    """Nucleus rows beside top-``--topp-vs``: target bytes per position and ids kept per position."""
    import torch

    from kdcache.cache.reader import CacheReader
    from kdcache.cache.stats import disk_bytes
    from kdcache.config import DumpConfig
    from kdcache.dump import dump

    arrays = ("topk_ids", "topk_logprobs", "tail_logmass", "topp_counts", "topp_ids", "topp_logprobs",
              "index/entry_offset", "index/num_entries")
    out = []
    for targets, k in [("topk", args.topp_vs)] + [(f"topp:{p},{args.topp_k}", args.topp_k) for p in args.topp.split(",")]:
        p = work / f"{targets.replace(':', '').replace(',', '-')}-k{k}.zarr"
        dump(DumpConfig(teacher=args.teacher, data=str(data), images=args.images, out=str(p), top_k=k, hidden="none",
                        targets=targets, num_workers=0))
        r = CacheReader(p)
        recs = r.read_range(0, 0, r.part_sizes[0])
        kept = torch.cat([torch.isfinite(x.topk_logprobs.float()).sum(1) for x in recs]).double()  # [P]
        b = disk_bytes(p)
        out.append((targets if targets != "topk" else f"topk:{k}", sum(b.get(a, 0) for a in arrays) / len(kept),
                    kept, float((kept == k).double().mean()) if targets != "topk" else float("nan")))
    head = f"{'targets':>16} {'B/pos':>8} {'vs top-' + str(args.topp_vs):>10} {'ids mean':>9} {'p50':>5} {'p95':>5} {'max':>5} {'capped':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    base = out[0][1]
    for name, bpp, kept, capped in out:
        q = torch.quantile(kept, torch.tensor([0.5, 0.95], dtype=torch.float64)).tolist()
        cap = "-" if capped != capped else f"{100 * capped:.1f}%"
        print(f"{name:>16} {bpp:>8.1f} {bpp / base:>10.2f} {kept.mean().item():>9.1f} {q[0]:>5.0f} {q[1]:>5.0f}"
              f" {kept.max().item():>5.0f} {cap:>7}")


if __name__ == "__main__":
    main()
