"""``kdcache inspect``: a cache's summary, and the teacher's top tokens for one sample."""

from __future__ import annotations

import math
from pathlib import Path

from .positions import KIND_NAMES


class UnknownSample(LookupError):
    """``--sample`` names no committed sample of the cache; the message lists near ids."""


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def summary_lines(stats: dict) -> list[str]:
    s = stats["settings"]
    targets = s["targets"] + (f" (draw seed {s['draw_seed']})" if "draw_seed" in s else "")
    lines = [
        f"cache      {stats['path']}",
        f"teacher    {stats['teacher']}",
        f"settings   k={stats['k']}  positions={','.join(s['positions'])}  log-probs={s['logprob_dtype']}  "
        f"hidden={s['hidden']}  T={s['temperature']}",
        f"targets    {targets}",
        f"samples    {stats['samples']} in {stats['parts']} part(s); skipped "
        + (", ".join(f"{n} {r}" for r, n in stats["skipped"].items()) or "none"),
        f"tokens     {stats['tokens']}",
        "positions  " + ", ".join(f"{k} {v}" for k, v in stats["positions"].items() if v),
        f"bytes      {_mb(stats['bytes_total'])} total; "
        f"{stats['bytes_per_position'] or 0:.1f} B/position; {_mb(stats['bytes_per_sample'] or 0)}/sample",
        "",
        f"{'kind':<10}{'positions':>10}{'kept mass mean':>16}{'p5':>8}{'p50':>8}{'p95':>8}",
    ]
    for kind, m in stats["kept_mass"].items():
        if m.get("n"):
            lines.append(f"{kind:<10}{m['n']:>10}{m['mean']:>16.4f}{m['p5']:>8.4f}{m['p50']:>8.4f}{m['p95']:>8.4f}")
    acc = stats["top1_accuracy_response"]
    ent = stats["mean_entropy_k1"]
    lines += ["", f"teacher top-1 accuracy on response tokens: {acc:.4f}" if acc is not None else
              "teacher top-1 accuracy: n/a (no response positions)",
              f"mean entropy over the k+1 buckets: {ent:.4f} nats" if ent is not None else ""]
    lines += relation_lines(stats["relation"])
    lines += ["", "bytes per array:"] + [f"  {k:<22}{_mb(v):>12}" for k, v in stats["bytes"].items() if v]
    return lines


def relation_lines(rel: dict) -> list[str]:
    """The relation targets (``kdcache.cache.stats.relation_stats``): mode, bytes per sample, and
    for lowrank:R the relative Gram error ||R - F F^T||_F / ||R||_F over samples."""
    if rel["array"] is None:
        return ["", f"relation   {rel['mode']}: no relation targets stored"]
    lines = ["", f"relation   {rel['mode']}: {rel['array']} {_mb(rel['bytes_per_sample'])}/sample on disk "
                 f"({_mb(rel['raw_bytes_per_sample'])}/sample raw)"]
    e = rel.get("relation_error")
    if e is not None:
        lines.append(f"relative Gram error over {e['n']} samples: " + (
            f"mean {e['mean']:.3g}  p50 {e['p50']:.3g}  p95 {e['p95']:.3g}  max {e['max']:.3g}" if e["n"] else "n/a"))
    return lines


def sample_lines(path, sample: str, tokenizer, top: int) -> list[str]:
    """Per distilled position: kind, the actual next token, and the teacher's top tokens."""
    from .cache.reader import CacheReader

    reader = CacheReader(path)
    rec = None
    for p in reader.parts.values():
        ids = reader.sample_ids(p, p.ok)
        if sample in ids:
            rec = reader.read_rows(p, p.ok[[ids.index(sample)]])[0]
            break
    if rec is None:
        import difflib

        known = [i for p in reader.parts.values() for i in reader.sample_ids(p, p.ok)]
        near = difflib.get_close_matches(sample, known, n=3, cutoff=0.5) or [i for i in known if sample in i][:3]
        raise UnknownSample(
            f"sample {sample!r} is not a committed sample of {path} ({len(known)} samples"
            + (f", ids like {known[0]!r} .. {known[-1]!r}" if known else "") + ")"
            + (f": did you mean {', '.join(repr(n) for n in near)}?" if near else
               ": pass an id from the data file's 'id' field (`kdcache export` lists them all)"))
    dec = (lambda i: repr(tokenizer.decode([int(i)]))) if tokenizer is not None else (lambda i: str(int(i)))
    lines = [f"sample {rec.sample_id} (row {rec.row}): {rec.num_tokens} tokens, {len(rec.positions)} positions", "",
             f"{'pos':>5} {'kind':<9} {'next token':<16} top tokens (p)"]
    for j, t in enumerate(rec.positions.tolist()):
        nxt = dec(rec.input_ids[t + 1]) if t + 1 < rec.num_tokens else "-"
        if rec.sample_counts is None:
            tops = "  ".join(f"{dec(i)} {math.exp(float(lp)):.3f}"  # topp: padding (-inf) after the kept ids
                             for i, lp in zip(rec.topk_ids[j, :top], rec.topk_logprobs[j, :top]) if lp > -math.inf)
        else:  # sampled: the drawn ids (count > 0) with their draw counts
            tops = "  ".join(f"{dec(i)} {math.exp(float(lp)):.3f} x{int(c)}" for i, lp, c in
                             zip(rec.topk_ids[j, :top], rec.topk_logprobs[j, :top], rec.sample_counts[j, :top]) if c > 0)
        tail = math.exp(float(rec.tail_logmass[j]))
        lines.append(f"{t:>5} {KIND_NAMES[int(rec.kinds[j])]:<9} {nxt:<16} {tops}  | rest {tail:.3f}")
    return lines


def inspect_cache(path, *, sample: str | None = None, tokenizer: str | None = None, top: int = 5) -> list[str]:
    from .cache.stats import cache_stats

    if sample is None:
        return summary_lines(cache_stats(path))
    from .cache.reader import CacheReader

    tok = None
    name = tokenizer or CacheReader(path).attrs["tokenizer"]["name_or_path"]
    if name and Path(name).exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    return sample_lines(path, sample, tok, top)
