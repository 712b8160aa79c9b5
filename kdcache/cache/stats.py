"""Summary statistics of a cache (``kdcache inspect``)."""

from __future__ import annotations

import os

import numpy as np

from kdcache.cache.format import (
    AXIS_INDEX,
    DATA_ARRAYS,
    GRAM_ARRAY,
    INDEX_ARRAYS,
    LM_HEAD_ARRAY,
    REASON_NAMES,
    RELATION_INDEX_ARRAYS,
    STATUS_OK,
    Layout,
    data_specs,
    relation_of,
)
from kdcache.cache.reader import CacheReader
from kdcache.cache.store import cache_location
from kdcache.positions import KIND_NAMES, KIND_RESPONSE


ENTRY_INDEX_COLUMNS = AXIS_INDEX["entries"]  # entry_offset, num_entries (targets topp)


def disk_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes stored per array, summed over parts (index arrays as ``index/<name>``); ``path`` a
    directory or URL (one listing per array prefix)."""
    loc = cache_location(path)
    parts = [n for n in loc.children("parts") if n.isdigit()]
    out = {}
    for name in DATA_ARRAYS:
        b = sum(loc.nbytes(f"parts/{p}/{name}") for p in parts)
        if b:
            out[name] = b
    for name in INDEX_ARRAYS:
        out[f"index/{name}"] = sum(loc.nbytes(f"parts/{p}/index/{name}") for p in parts)
    for name in (*RELATION_INDEX_ARRAYS, *ENTRY_INDEX_COLUMNS):  # only in their relation mode / target kind
        b = sum(loc.nbytes(f"parts/{p}/index/{name}") for p in parts)
        if b:
            out[f"index/{name}"] = b
    out[GRAM_ARRAY] = loc.nbytes(GRAM_ARRAY)
    lm = loc.nbytes(LM_HEAD_ARRAY)
    if lm:
        out[LM_HEAD_ARRAY] = lm
    return out


def _summary(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"n": 0}
    p5, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"n": int(x.size), "mean": float(x.mean()), "p5": float(p5), "p50": float(p50),
            "p95": float(p95)}


def relation_stats(reader: CacheReader, sizes: dict[str, int]) -> dict:
    """The relation targets of a cache: mode, bytes per sample (on disk, and raw: N_vis x width x
    itemsize before compression), and for ``lowrank:R`` the per-sample relative Gram error
    ``index/relation_error`` summarised over ok samples (mean, p50, p95, max)."""
    settings = reader.attrs["settings"]
    names = [n for n in ("visual_hidden", "visual_factor") if n in sizes]
    S = reader.num_samples
    n_vis = sum(int(p.cols["num_visual"][p.ok].sum()) for p in reader.parts.values())
    out = {"mode": settings["relation"], "array": names[0] if names else None,
           "bytes_per_sample": sum(sizes[n] for n in names) / S if S and names else 0.0,
           "raw_bytes_per_sample": 0.0}
    if names and S:
        # row bytes as stored; the layout only sets chunking
        spec = data_specs(settings, int(reader.attrs["teacher"]["hidden_size"]), Layout())[names[0]]
        out["raw_bytes_per_sample"] = n_vis * spec.row_bytes / S
    if relation_of(settings).factored:
        err = np.concatenate([p.cols["relation_error"][p.ok].astype(np.float64) for p in reader.parts.values()]
                             or [np.zeros(0)])
        out["relation_error"] = ({"n": int(err.size), "mean": float(err.mean()), "p50": float(np.percentile(err, 50)),
                                  "p95": float(np.percentile(err, 95)), "max": float(err.max())}
                                 if err.size else {"n": 0})
    return out


def cache_stats(path: str | os.PathLike, *, block: int = 256) -> dict:
    """Counts, sizes and teacher-quality figures of the committed samples.

    kept mass per kind = 1 - exp(tail) (how much of the teacher's distribution the top-k keeps);
    top-1 accuracy on response positions = mean(topk_ids[:, 0] == input_ids[pos + 1]);
    entropy over the k + 1 buckets = -sum_i p_i log p_i - p_tail * tail (nats; 0 for the tail
    bucket when tail = -inf, and for the padding columns of ``targets: sampled:N``, log-prob -inf).
    With sampled targets "kept mass" is the mass of the distinct drawn ids and "top-1" the most
    probable drawn id.
    """
    reader = CacheReader(path)
    attrs = reader.attrs
    skipped: dict[str, int] = {}
    tokens = 0
    kept = {k: [] for k in KIND_NAMES}
    entropy_sum, entropy_n = 0.0, 0
    top1_hit, top1_n = 0, 0
    for p in reader.parts.values():
        for code, n in zip(*np.unique(p.cols["status"], return_counts=True)):
            if code != STATUS_OK:
                name = REASON_NAMES.get(int(code), f"code_{int(code)}")
                skipped[name] = skipped.get(name, 0) + int(n)
        for s in range(0, len(p.ok), block):
            for r in reader.read_rows(p, p.ok[s : s + block]):
                tokens += r.num_tokens
                lp = r.topk_logprobs.numpy().astype(np.float64)  # [P, k]
                tail = r.tail_logmass.numpy().astype(np.float64)  # [P]
                kinds = r.kinds.numpy()
                pt = np.exp(tail)
                for code in KIND_NAMES:
                    kept[code].append(1.0 - pt[kinds == code])
                tail_term = np.where(pt > 0, pt * tail, 0.0)
                finite = np.where(np.isneginf(lp), 0.0, lp)
                plp = np.exp(finite) * finite * np.isfinite(lp)  # padding (-inf) adds 0, not 0 * -inf = NaN
                ent = -plp.sum(axis=1) - tail_term  # [P]
                entropy_sum += float(ent.sum())
                entropy_n += int(ent.size)
                resp = kinds == KIND_RESPONSE
                pos = r.positions.numpy()[resp]
                target = r.input_ids.numpy()[pos + 1]
                top1_hit += int((r.topk_ids.numpy()[resp, 0] == target).sum())
                top1_n += int(resp.sum())
    sizes = disk_bytes(path)
    total_bytes = sum(sizes.values())
    num_pos = {KIND_NAMES[c]: int(sum(len(x) for x in kept[c])) for c in KIND_NAMES}
    P = sum(num_pos.values())
    S = reader.num_samples
    return {
        "path": str(path),
        "teacher": attrs["teacher"]["name_or_path"],
        "k": int(attrs["settings"]["top_k"]),
        "targets": attrs["settings"]["targets"],
        "settings": attrs["settings"],
        "parts": len(reader.parts),
        "samples": S,
        "skipped": skipped,
        "tokens": tokens,
        "positions": num_pos,
        "bytes": sizes,
        "bytes_total": total_bytes,
        "bytes_per_position": total_bytes / P if P else None,
        "bytes_per_sample": total_bytes / S if S else None,
        "kept_mass": {KIND_NAMES[c]: _summary(np.concatenate(kept[c]) if kept[c] else np.zeros(0))
                      for c in KIND_NAMES},
        "top1_accuracy_response": top1_hit / top1_n if top1_n else None,
        "mean_entropy_k1": entropy_sum / entropy_n if entropy_n else None,
        "relation": relation_stats(reader, sizes),
    }
