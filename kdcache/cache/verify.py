"""Check a whole cache: schema, fingerprints, index consistency and every committed sample.

Problems are collected as strings naming part / sample id / row / array and what is wrong, never
raised, so one run lists everything (``kdcache verify``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcache.cache.format import (
    AXIS_OF,
    REASON_NAMES,
    STATUS_OK,
    TOTAL_KEYS,
    CacheFormatError,
    attr_differences,
    bf16_bits_to_float32,
    checksum_arrays,
    logprob_tolerance,
    sample_checksum,
    validate_attrs,
)
from kdcache.cache.reader import PartIndex, list_parts, load_part_index
from kdcache.cache.writer import GRAM_ARRAY, read_json_attrs
from kdcache.positions import ROLE_VISUAL, select_positions

CHECKED = ("input_ids", "roles", "positions", "kinds", "topk_ids", "topk_logprobs", "tail_logmass")


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    samples_checked: int = 0
    samples_skipped: int = 0
    parts: int = 0
    max_problems: int = 1000
    dropped: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, msg: str) -> None:
        if len(self.problems) < self.max_problems:
            self.problems.append(msg)
        else:
            self.dropped += 1

    def __str__(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'FAILED'} - {self.parts} part(s), "
                f"{self.samples_checked} samples checked, "
                f"{self.samples_skipped} skipped by the dump")
        lines = [head] + [f"  - {p}" for p in self.problems]
        if self.dropped:
            lines.append(f"  ... and {self.dropped} more problems")
        return "\n".join(lines)


def verify_cache(path: str | os.PathLike, vocab_size: int | None = None,
                 expected_attrs: dict | None = None, *, block: int = 256) -> VerifyReport:
    """Check every committed sample of the cache at ``path``.

    vocab_size: bound for token/top-k ids (default: the cache's teacher.vocab_size).
    expected_attrs: attributes the caller expects (e.g. ``make_attrs`` of this run); every
    differing non-volatile key is a problem.
    """
    import zarr
    from zarr.storage import LocalStore

    path = Path(path)
    rep = VerifyReport(str(path))
    try:
        attrs = read_json_attrs(path)
    except CacheFormatError as e:
        rep.add(str(e))
        return rep
    if attrs is None:
        rep.add(f"no cache at {path} (no zarr.json)")
        return rep
    try:
        validate_attrs(attrs, where="root attributes")
    except CacheFormatError as e:
        rep.add(str(e))
        return rep
    if expected_attrs is not None:
        for d in attr_differences(attrs, expected_attrs):
            rep.add(f"fingerprint mismatch: {d}")
    vocab = int(vocab_size if vocab_size is not None else attrs["teacher"]["vocab_size"])
    store = LocalStore(path, read_only=True)
    try:
        _check_gram(zarr, store, path, attrs, rep)
    except Exception as e:
        rep.add(f"{GRAM_ARRAY}: unreadable ({type(e).__name__}: {e})")
    ranks = list_parts(path)
    rep.parts = len(ranks)
    if not ranks:
        rep.add("no parts/<rank> groups: nothing was committed")
    for rank in ranks:
        try:
            p = load_part_index(zarr, store, path, rank)
        except Exception as e:  # corrupt index chunk, missing array, bad attributes
            rep.add(f"part {rank}: cannot read the index ({type(e).__name__}: {e})")
            continue
        try:
            arrays = _open_arrays(zarr, store, rank, attrs, rep)
            if arrays is None:
                continue
            if not _check_index(p, arrays, attrs, rep):
                continue
            rep.samples_skipped += int(np.count_nonzero(p.cols["status"] != STATUS_OK))
            for s in range(0, len(p.ok), block):
                _check_block(p, arrays, p.ok[s : s + block], attrs, vocab, rep)
        except Exception as e:  # verify reports, never raises: whatever the damage, name the part
            rep.add(f"part {rank}: unreadable ({type(e).__name__}: {e})")
    return rep


def _check_gram(zarr, store, path: Path, attrs: dict, rep: VerifyReport) -> None:
    D = int(attrs["teacher"]["hidden_size"])
    if not (path / GRAM_ARRAY / "zarr.json").exists():
        if attrs["settings"]["relation"] == "hidden":
            rep.add(f"{GRAM_ARRAY} missing although settings.relation is 'hidden' "
                    "(rank 0 writes it with writer.write_gram)")
        return
    try:
        g = zarr.open_array(store, path=GRAM_ARRAY, mode="r")[...]
    except Exception as e:
        rep.add(f"{GRAM_ARRAY}: cannot decode ({type(e).__name__}: {e})")
        return
    if g.shape != (D, D):
        rep.add(f"{GRAM_ARRAY}: shape {g.shape}, expected [hidden_size, hidden_size] = [{D}, {D}]")
    elif not np.isfinite(g).all():
        rep.add(f"{GRAM_ARRAY}: non-finite values")


def _open_arrays(zarr, store, rank: int, attrs: dict, rep: VerifyReport) -> dict | None:
    names = list(CHECKED) + ["sample_id_bytes"]
    if attrs["settings"]["hidden"] != "none":
        names.append("visual_hidden")
    out = {}
    for n in names:
        try:
            out[n] = zarr.open_array(store, path=f"parts/{rank}/{n}", mode="r")
        except Exception as e:
            rep.add(f"part {rank}: array {n} cannot be opened ({type(e).__name__}: {e})")
    return out if len(out) == len(names) else None


def _check_index(p: PartIndex, arrays: dict, attrs: dict, rep: VerifyReport) -> bool:
    """Offsets contiguous from 0, totals equal the commit record, arrays long enough."""
    good = True
    where = f"part {p.rank}"
    for axis in TOTAL_KEYS:
        off, ln = p.offset(axis).astype(np.int64), p.length(axis)
        expect = np.concatenate([[0], np.cumsum(ln)[:-1]]) if len(ln) else off
        bad = np.nonzero(off != expect)[0]
        if len(bad):
            i = int(bad[0])
            rep.add(f"{where}: index {axis} offsets not contiguous from index row {i} "
                    f"(row {int(p.cols['row'][i])}): offset {int(off[i])}, "
                    f"expected {int(expect[i])}")
            good = False
        total = int(ln.sum())
        if total != p.totals.get(axis):
            rep.add(f"{where}: index says {total} {axis} rows, "
                    f"commit record says {p.totals.get(axis)}")
            good = False
    for name, arr in arrays.items():
        need = p.totals.get(AXIS_OF[name], 0)
        if arr.shape[0] < need or (p.finished and arr.shape[0] != need):
            rep.add(f"{where}: array {name} has {arr.shape[0]} rows, the index commits {need}"
                    + (" (finished parts are trimmed exactly)" if p.finished else ""))
            good = False
    k = int(attrs["settings"]["top_k"])
    for name in ("topk_ids", "topk_logprobs"):
        if arrays[name].shape[1:] != (k,):
            rep.add(f"{where}: array {name} rows are {arrays[name].shape[1:]}, "
                    f"expected top_k = {k}")
            good = False
    if "visual_hidden" in arrays:
        D = int(attrs["teacher"]["hidden_size"])
        if arrays["visual_hidden"].shape[1:] != (D,):
            rep.add(f"{where}: visual_hidden rows are {arrays['visual_hidden'].shape[1:]}, "
                    f"expected hidden_size = {D}")
            good = False
    rows = p.cols["row"].astype(np.int64)
    n_rows = int(attrs["dataset"]["num_rows"])
    bad = np.nonzero((rows < 0) | (rows >= n_rows))[0]
    if len(bad):
        rep.add(f"{where}: index/row {int(bad[0])} holds row {int(rows[bad[0]])}, outside the data file's "
                f"[0, {n_rows})")
        good = False
    # status is outside the per-sample crc32: a skip holds no data rows, an ok sample some tokens
    ok = p.cols["status"] == STATUS_OK
    data_rows = p.length("tokens") + p.length("positions") + p.length("visual")
    bad = np.nonzero((ok & (p.length("tokens") <= 0)) | (~ok & (data_rows != 0)))[0]
    if len(bad):
        i = int(bad[0])
        rep.add(f"{where}: index row {i} (row {int(rows[i])}) has status {int(p.cols['status'][i])} but "
                f"{int(data_rows[i])} data rows (skipped samples have none, ok samples have tokens)")
        good = False
    if len(np.unique(rows)) != len(rows):
        rep.add(f"{where}: index/row lists a dataset row more than once")
        good = False
    unknown = sorted({int(s) for s in p.cols["status"]} - {STATUS_OK} - set(REASON_NAMES))
    if unknown:
        rep.add(f"{where}: unknown status codes {unknown} in index/status")
    return good


def _read(arr, lo: int, hi: int):
    try:
        return arr[lo:hi], None
    except Exception as e:  # truncated shard, crc32c mismatch, blosc error, ...
        return None, f"{type(e).__name__}: {e}"


def _check_block(p: PartIndex, arrays: dict, idx: np.ndarray, attrs: dict, vocab: int,
                 rep: VerifyReport) -> None:
    settings = attrs["settings"]
    kinds_wanted = tuple(settings["positions"])
    hidden_mode = settings["hidden"]
    lp_dtype = np.dtype(settings["logprob_dtype"])
    rank = p.rank
    id_lo = int(p.cols["id_offset"][idx[0]])
    id_hi = int(p.cols["id_offset"][idx[-1]] + p.cols["id_len"][idx[-1]])
    raw_ids, err = _read(arrays["sample_id_bytes"], id_lo, id_hi)
    if err is not None:
        rep.add(f"part {rank}: array sample_id_bytes rows {id_lo}:{id_hi} cannot be decoded ({err})")
    slabs, failed = {}, {}
    for name, arr in arrays.items():
        if name == "sample_id_bytes":
            continue
        axis = AXIS_OF[name]
        lo = int(p.offset(axis)[idx[0]])
        hi = int(p.offset(axis)[idx[-1]] + p.length(axis)[idx[-1]])
        slabs[name], failed[name] = _read(arr, lo, hi)
        slabs[name] = (slabs[name], lo)
    for i in idx:
        rep.samples_checked += 1
        row = int(p.cols["row"][i])
        if raw_ids is not None:
            o = int(p.cols["id_offset"][i]) - id_lo
            sid = bytes(raw_ids[o : o + int(p.cols["id_len"][i])]).decode("utf-8", "replace")
            # ids are not in the sample checksum: a lost or garbled id chunk shows as NUL / U+FFFD
            if not sid or "\x00" in sid or "\ufffd" in sid:
                rep.add(f"part {rank} row {int(p.cols['row'][i])}: array sample_id_bytes gives an invalid "
                        f"sample id {sid!r} (damaged or missing chunk)")
        else:
            sid = "<unreadable id>"
        where = f"part {rank} sample {sid!r} (row {row})"
        data = {}
        for name, (slab, lo) in slabs.items():
            axis = AXIS_OF[name]
            o, n = int(p.offset(axis)[i]), int(p.length(axis)[i])
            if slab is None:
                # localise the decode error to this sample's rows
                one, e = _read(arrays[name], o, o + n)
                if one is None:
                    rep.add(f"{where}: array {name} rows {o}:{o + n} cannot be decoded ({e})")
                    continue
                data[name] = one
            else:
                data[name] = slab[o - lo : o - lo + n]
        if len(data) != len(slabs):
            continue
        _check_sample(where, data, p, i, kinds_wanted, hidden_mode, lp_dtype, vocab, attrs, rep)


def _check_sample(where, d, p: PartIndex, i, kinds_wanted, hidden_mode, lp_dtype, vocab, attrs,
                  rep: VerifyReport) -> None:
    hidden = d.get("visual_hidden")
    crc = sample_checksum(checksum_arrays(*(d[n] for n in CHECKED), hidden))
    if crc != int(p.cols["checksum"][i]):
        rep.add(f"{where}: checksum mismatch (stored {int(p.cols['checksum'][i]):#010x}, "
                f"data gives {crc:#010x})")
    ids, roles = d["input_ids"], d["roles"]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        rep.add(f"{where}: array input_ids has ids outside [0, {vocab}): "
                f"min {int(ids.min())}, max {int(ids.max())}")
    tid = d["topk_ids"]
    if tid.size and (tid.min() < 0 or tid.max() >= vocab):
        rep.add(f"{where}: array topk_ids has ids outside [0, {vocab}): "
                f"min {int(tid.min())}, max {int(tid.max())}")
    if roles.size and roles.max() > 2:
        rep.add(f"{where}: array roles has unknown role {int(roles.max())}")
        return
    want_pos, want_kinds = select_positions(roles, kinds_wanted)
    if not np.array_equal(d["positions"], want_pos):
        rep.add(f"{where}: array positions ({len(d['positions'])}) differ from the positions the "
                f"roles give for {kinds_wanted} ({len(want_pos)})")
    elif not np.array_equal(d["kinds"], want_kinds):
        rep.add(f"{where}: array kinds differ from the kinds the roles give")
    counts = np.bincount(want_kinds, minlength=3)[:3]
    if not np.array_equal(counts, p.cols["counts"][i]):
        rep.add(f"{where}: index counts {p.cols['counts'][i].tolist()} but roles give "
                f"{counts.tolist()} (prompt, visual, response)")
    lp = d["topk_logprobs"].astype(np.float64)  # [P, k]
    tail = d["tail_logmass"].astype(np.float64)  # [P]
    tol_lp = 2 * float(np.finfo(lp_dtype).eps)
    if not np.isfinite(lp).all():
        rep.add(f"{where}: array topk_logprobs has non-finite values")
        return
    if (lp > tol_lp).any():
        rep.add(f"{where}: array topk_logprobs has log-probs > 0 (max {lp.max():.4g})")
    if lp.shape[1] > 1 and (np.diff(lp, axis=1) > tol_lp * np.maximum(1, np.abs(lp[:, 1:]))).any():
        rep.add(f"{where}: array topk_logprobs is not sorted descending")
    if np.isnan(tail).any() or (tail == np.inf).any():
        rep.add(f"{where}: array tail_logmass has NaN or +inf")
        return
    if (tail > 1e-6).any():
        rep.add(f"{where}: array tail_logmass > 0 (tail mass exp(tail) > 1, max {tail.max():.4g})")
    prob = np.exp(lp)
    mass = prob.sum(axis=1) + np.exp(tail)  # [P]
    tol = logprob_tolerance(prob, lp, lp_dtype)
    bad = np.nonzero(np.abs(mass - 1) > tol)[0]
    if len(bad):
        j = int(bad[0])
        rep.add(f"{where}: sum(exp(topk)) + exp(tail) = {mass[j]:.6f} at position "
                f"{int(d['positions'][j])} (and {len(bad) - 1} more), tolerance {tol[j]:.2g}")
    n_vis = int(np.count_nonzero(roles == ROLE_VISUAL))
    if hidden_mode != "none":
        D = int(attrs["teacher"]["hidden_size"])
        if int(p.cols["num_visual"][i]) != n_vis or hidden.shape != (n_vis, D):
            rep.add(f"{where}: array visual_hidden is {list(hidden.shape)} (index num_visual "
                    f"{int(p.cols['num_visual'][i])}), expected [{n_vis} visual tokens, {D}]")
        h = bf16_bits_to_float32(hidden) if hidden.dtype == np.uint16 else hidden
        if not np.isfinite(h).all():
            rep.add(f"{where}: array visual_hidden has non-finite values")
    elif int(p.cols["num_visual"][i]) != 0:
        rep.add(f"{where}: index num_visual {int(p.cols['num_visual'][i])} but settings.hidden "
                "is 'none'")
