"""Check a whole cache: schema, fingerprints, index consistency and every committed sample.

Problems are collected as strings naming part / sample id / row / array and what is wrong, never
raised, so one run lists everything (``kdcache verify``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from kdcache.cache.format import (
    AXIS_OF,
    GRAM_ARRAY,
    LM_HEAD_ARRAY,
    REASON_NAMES,
    STATUS_OK,
    CacheFormatError,
    attr_differences,
    bf16_bits_to_float32,
    checksum_arrays,
    data_array_names,
    logprob_tolerance,
    read_json_attrs,
    relation_of,
    sample_checksum,
    storage_view,
    targets_of,
    validate_attrs,
)
from kdcache.cache.reader import PartIndex, list_parts, load_part_index
from kdcache.cache.store import CacheLocation, cache_location
from kdcache.positions import ROLE_VISUAL, select_positions

BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8 significand bits)


@dataclass
class Top1Probe:
    """Positions kept for the targets-hidden consistency check: the stored top-1 id must be the
    argmax of position_hidden @ lm_head^T. At most ``per_sample`` positions of a sample and
    ``budget`` in all (the check is a matmul against the whole [V, D] head)."""

    budget: int = 256
    per_sample: int = 8
    where: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)  # float32 [D] rows
    top1: list[int] = field(default_factory=list)

    def take(self, where: str, positions: np.ndarray, hidden: np.ndarray, top1: np.ndarray) -> None:
        n = min(self.per_sample, self.budget - len(self.top1), len(positions))
        if n <= 0:
            return
        rows = np.linspace(0, len(positions) - 1, n).round().astype(np.int64)  # spread over the sample
        for r in rows:
            self.where.append(where)
            self.positions.append(int(positions[r]))
            self.hidden.append(hidden[r].astype(np.float32))
            self.top1.append(int(top1[r]))


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

    def verdict(self) -> str:
        """One line for a failed check (the CLI's last line): how many problems, the first, the fix."""
        n = len(self.problems) + self.dropped
        return (f"cache {self.path} failed verification: {n} problem{'s' if n != 1 else ''} listed above, the first: "
                f"{self.problems[0]}. Fix: dump it again into a new --out (an unfinished dump: rerun its command "
                "to finish it, then verify again)")

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

    path = cache_location(path)
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
    store = path.zarr_store(read_only=True)
    if not path.is_local:  # every object is read: fetch each whole, once
        from kdcache.cache.remote import WholeObjectStore

        store = WholeObjectStore(store, url=path.url)
    try:
        _check_gram(zarr, store, path, attrs, rep)
    except Exception as e:
        rep.add(f"{GRAM_ARRAY}: unreadable ({type(e).__name__}: {e})")
    lm_head = None
    if targets_of(attrs["settings"]).exact:
        try:
            lm_head = _check_lm_head(zarr, store, path, attrs, rep)
        except Exception as e:
            rep.add(f"{LM_HEAD_ARRAY}: unreadable ({type(e).__name__}: {e})")
    probe = Top1Probe() if lm_head is not None else None
    ranks = list_parts(path)
    rep.parts = len(ranks)
    if not ranks:
        rep.add("no parts/<rank> groups: nothing was committed")
    for rank in ranks:
        try:
            p = load_part_index(zarr, store, path, rank, attrs["settings"])
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
                _check_block(p, arrays, p.ok[s : s + block], attrs, vocab, rep, probe)
        except Exception as e:  # verify reports, never raises: whatever the damage, name the part
            rep.add(f"part {rank}: unreadable ({type(e).__name__}: {e})")
    if probe is not None and probe.top1:
        _check_top1(probe, lm_head, rep)
    return rep


def _check_lm_head(zarr, store, path: CacheLocation, attrs: dict, rep: VerifyReport):
    """targets hidden: teacher_lm_head present, [vocab_size, hidden_size], finite. Returns it as
    float32 [V, D] for the top-1 probe, or None when it is not usable."""
    V, D = int(attrs["teacher"]["vocab_size"]), int(attrs["teacher"]["hidden_size"])
    if not path.exists(f"{LM_HEAD_ARRAY}/zarr.json"):
        rep.add(f"{LM_HEAD_ARRAY} missing although settings.targets is 'hidden' (rank 0 writes it with "
                "writer.write_lm_head)")
        return None
    try:
        w = zarr.open_array(store, path=LM_HEAD_ARRAY, mode="r")[...]
    except Exception as e:
        rep.add(f"{LM_HEAD_ARRAY}: cannot decode ({type(e).__name__}: {e})")
        return None
    if w.shape != (V, D):
        rep.add(f"{LM_HEAD_ARRAY}: shape {w.shape}, expected [vocab_size, hidden_size] = [{V}, {D}]")
        return None
    w = bf16_bits_to_float32(w) if w.dtype == np.uint16 else w.astype(np.float32)
    if not np.isfinite(w).all():
        rep.add(f"{LM_HEAD_ARRAY}: non-finite values")
        return None
    return w


def _check_top1(probe: Top1Probe, w: np.ndarray, rep: VerifyReport) -> None:
    """Stored top-1 id == argmax(h W^T) at the probed positions, unless the recomputed gap between
    the two is within bf16 rounding of both logits: |z_i - fl(z_i)| <= 2 u sum_d |h_d w_id| for
    bf16-rounded h and W and a bf16 teacher forward (u = 2^-8), for each of the two ids."""
    H = np.stack(probe.hidden)  # [n, D] float32
    z = H @ w.T  # [n, V]
    best = z.argmax(axis=1)  # [n]
    stored = np.asarray(probe.top1)
    for j in np.nonzero(best != stored)[0]:
        a, b = int(best[j]), int(stored[j])
        if not 0 <= b < w.shape[0]:
            continue  # out-of-range ids are reported by the id check
        bound = 2 * BF16_U * (np.abs(H[j]) @ (np.abs(w[a]) + np.abs(w[b]))) + 1e-5
        gap = float(z[j, a] - z[j, b])
        if gap > bound:
            rep.add(f"{probe.where[j]}: stored top-1 id {b} at position {probe.positions[j]} is not the argmax "
                    f"{a} of position_hidden @ {LM_HEAD_ARRAY}^T (logit gap {gap:.4g} > bf16 rounding {bound:.2g})")


def _check_gram(zarr, store, path: CacheLocation, attrs: dict, rep: VerifyReport) -> None:
    D = int(attrs["teacher"]["hidden_size"])
    if not path.exists(f"{GRAM_ARRAY}/zarr.json"):
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
    names = data_array_names(attrs["settings"]) + ["sample_id_bytes"]
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
    for axis in p.axes:
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
    for name in ("topk_ids", "topk_logprobs", "sample_counts"):
        if name in arrays and arrays[name].shape[1:] != (k,):
            rep.add(f"{where}: array {name} rows are {arrays[name].shape[1:]}, "
                    f"expected top_k = {k}")
            good = False
    D = int(attrs["teacher"]["hidden_size"])
    for name in ("visual_hidden", "position_hidden"):
        if name in arrays and arrays[name].shape[1:] != (D,):
            rep.add(f"{where}: {name} rows are {arrays[name].shape[1:]}, "
                    f"expected hidden_size = {D}")
            good = False
    R = relation_of(attrs["settings"]).rank
    if "visual_factor" in arrays and arrays["visual_factor"].shape[1:] != (R,):
        rep.add(f"{where}: visual_factor rows are {arrays['visual_factor'].shape[1:]}, expected the rank "
                f"{R} of settings.relation {attrs['settings']['relation']!r}")
        good = False
    if R is not None:
        err = p.cols["relation_error"].astype(np.float64)
        bad = np.nonzero(~np.isfinite(err) | (err < 0) | (err > 1.5) | ((p.cols["status"] != STATUS_OK) & (err != 0)))[0]
        if len(bad):
            i = int(bad[0])
            rep.add(f"{where}: index/relation_error of index row {i} (row {int(p.cols['row'][i])}) is {err[i]!r}, "
                    f"expected a relative Gram error in [0, 1.5] (0 for a skipped sample); {len(bad)} such row(s)")
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


def _check_visual_rows(where: str, name: str, a: np.ndarray, indexed: int, n_vis: int, width: int,
                       width_txt: str, rep: VerifyReport) -> None:
    """One row per visual token (and as many as the index says), ``width`` wide, all finite;
    bf16 bit patterns (uint16) are widened first."""
    if indexed != n_vis or a.shape != (n_vis, width):
        rep.add(f"{where}: array {name} is {list(a.shape)} (index num_visual {indexed}), "
                f"expected [{n_vis} visual tokens, {width_txt}]")
    x = bf16_bits_to_float32(a) if a.dtype == np.uint16 else a
    if not np.isfinite(x).all():
        rep.add(f"{where}: array {name} has non-finite values")


def _read(arr, lo: int, hi: int):
    try:
        return storage_view(arr[lo:hi], arr.attrs.get("logical_dtype")), None
    except Exception as e:  # truncated shard, crc32c mismatch, blosc error, ...
        return None, f"{type(e).__name__}: {e}"


def _check_block(p: PartIndex, arrays: dict, idx: np.ndarray, attrs: dict, vocab: int,
                 rep: VerifyReport, probe: Top1Probe | None = None) -> None:
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
        sid_bytes = b""
        if raw_ids is not None:
            o = int(p.cols["id_offset"][i]) - id_lo
            sid_bytes = bytes(raw_ids[o : o + int(p.cols["id_len"][i])])
            sid = sid_bytes.decode("utf-8", "replace")
            # the checksum covers the id too; this names the usual damage (a lost chunk reads as NUL)
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
        _check_sample(where, data, p, i, kinds_wanted, hidden_mode, lp_dtype, vocab, attrs, rep,
                      sid_bytes=sid_bytes, probe=probe)


def _check_sample(where, d, p: PartIndex, i, kinds_wanted, hidden_mode, lp_dtype, vocab, attrs,
                  rep: VerifyReport, *, sid_bytes: bytes, probe: Top1Probe | None = None) -> None:
    hidden = d.get("visual_hidden")
    factor = d.get("visual_factor")
    crc = sample_checksum(int(p.cols["row"][i]), sid_bytes, checksum_arrays(d))
    if crc != int(p.cols["checksum"][i]):
        rep.add(f"{where}: checksum mismatch (stored {int(p.cols['checksum'][i]):#010x}, "
                f"data gives {crc:#010x})")
    ids, roles = d["input_ids"], d["roles"]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        rep.add(f"{where}: array input_ids has ids outside [0, {vocab}): "
                f"min {int(ids.min())}, max {int(ids.max())}")
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
    targets_of(attrs["settings"]).verify(where, d, lp_dtype, vocab, rep)
    n_vis = int(np.count_nonzero(roles == ROLE_VISUAL))
    D = int(attrs["teacher"]["hidden_size"])
    if hidden is not None:
        _check_visual_rows(where, "visual_hidden", hidden, int(p.cols["num_visual"][i]), n_vis, D, str(D), rep)
    elif factor is not None:
        R = relation_of(attrs["settings"]).rank
        _check_visual_rows(where, "visual_factor", factor, int(p.cols["num_visual"][i]), n_vis, R, f"rank {R}", rep)
    elif int(p.cols["num_visual"][i]) != 0:
        why = ("'none'" if not relation_of(attrs["settings"]).has_targets
               else "rebuilt from position_hidden (targets hidden)")
        rep.add(f"{where}: index num_visual {int(p.cols['num_visual'][i])} but the visual hidden states are {why}")
    if "position_hidden" in d:
        ph = d["position_hidden"]
        P = len(d["positions"])
        if ph.shape != (P, D):
            rep.add(f"{where}: array position_hidden is {list(ph.shape)}, expected [{P} positions, {D}]")
            return
        h = bf16_bits_to_float32(ph) if ph.dtype == np.uint16 else ph.astype(np.float32)
        if not np.isfinite(h).all():
            bad = np.nonzero(~np.isfinite(h).all(axis=1))[0]
            rep.add(f"{where}: array position_hidden has non-finite values at position "
                    f"{int(d['positions'][bad[0]])} ({len(bad)} row(s))")
        elif probe is not None and P:
            probe.take(where, d["positions"], h, d["topk_ids"][:, 0])


def check_id_range(where: str, name: str, ids: np.ndarray, vocab: int, rep: VerifyReport) -> None:
    """Every id of array ``name`` in [0, vocab)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        rep.add(f"{where}: array {name} has ids outside [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}")


def check_topk_rows(where: str, d: dict, lp_dtype: np.dtype, rep: VerifyReport) -> None:
    """targets topk / hidden: finite log-probs <= 0 sorted descending, tail in [-inf, 0], and the
    k + 1 buckets sum to 1 within the stored dtype's rounding."""
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
    if not _tail_ok(where, tail, rep):
        return
    prob = np.exp(lp)
    check_mass(where, d, prob, lp, tail, lp_dtype, rep)


def _tail_ok(where: str, tail: np.ndarray, rep: VerifyReport) -> bool:
    if np.isnan(tail).any() or (tail == np.inf).any():
        rep.add(f"{where}: array tail_logmass has NaN or +inf")
        return False
    if (tail > 1e-6).any():
        rep.add(f"{where}: array tail_logmass > 0 (tail mass exp(tail) > 1, max {tail.max():.4g})")
    return True


def check_mass(where, d, prob, lp_abs_src, tail, lp_dtype, rep: VerifyReport) -> None:
    """sum(prob) + exp(tail) = 1 per position within ``logprob_tolerance`` (prob, |log-prob| [P, k],
    0 on padding columns)."""
    mass = prob.sum(axis=1) + np.exp(tail)  # [P]
    tol = logprob_tolerance(prob, lp_abs_src, lp_dtype)
    bad = np.nonzero(np.abs(mass - 1) > tol)[0]
    if len(bad):
        j = int(bad[0])
        rep.add(f"{where}: sum(exp(topk)) + exp(tail) = {mass[j]:.6f} at position "
                f"{int(d['positions'][j])} (and {len(bad) - 1} more), tolerance {tol[j]:.2g}")


def check_sampled_rows(where: str, d: dict, lp_dtype: np.dtype, n: int, rep: VerifyReport) -> None:
    """targets sampled:N: per position the counts sum to N; the columns with a count come first,
    hold distinct ids and finite log-probs <= 0 sorted descending; padding columns have count 0,
    id 0 and log-prob -inf; the drawn ids' mass plus the tail is 1."""
    c = d["sample_counts"].astype(np.int64)  # [P, N]
    ids = d["topk_ids"].astype(np.int64)  # [P, N]
    lp = d["topk_logprobs"].astype(np.float64)  # [P, N]
    tail = d["tail_logmass"].astype(np.float64)  # [P]
    if not c.size:
        return
    pos = d["positions"]
    sums = c.sum(axis=1)
    bad = np.nonzero(sums != n)[0]
    if len(bad):
        j = int(bad[0])
        rep.add(f"{where}: array sample_counts sums to {int(sums[j])} at position {int(pos[j])}, expected "
                f"N = {n} draws (and {len(bad) - 1} more)")
        return
    drawn = c > 0  # [P, N]
    if (drawn[:, 1:] & ~drawn[:, :-1]).any():
        rep.add(f"{where}: array sample_counts has drawn ids after padding columns (drawn ids come first)")
        return
    pad = ~drawn
    if (pad & ~np.isneginf(lp)).any() or (pad & (ids != 0)).any():
        rep.add(f"{where}: padding columns (count 0) must hold id 0 and log-prob -inf")
    lp_d = np.where(drawn, lp, 0.0)
    if not np.isfinite(lp_d).all():
        rep.add(f"{where}: array topk_logprobs has non-finite log-probs for drawn ids")
        return
    tol_lp = 2 * float(np.finfo(lp_dtype).eps)
    if (lp_d > tol_lp).any():
        rep.add(f"{where}: array topk_logprobs has log-probs > 0 (max {lp_d.max():.4g})")
    both = drawn[:, 1:] & drawn[:, :-1]
    if (both & (np.diff(lp_d, axis=1) > tol_lp * np.maximum(1, np.abs(lp_d[:, 1:])))).any():
        rep.add(f"{where}: array topk_logprobs is not sorted descending over the drawn ids")
    # distinct drawn ids: padding replaced by distinct negatives, then look for equal neighbours
    uniq = np.where(drawn, ids, -1 - np.arange(ids.shape[1]))
    srt = np.sort(uniq, axis=1)
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        rep.add(f"{where}: array topk_ids repeats a drawn id at one position (ids must be distinct)")
    if not _tail_ok(where, tail, rep):
        return
    check_mass(where, d, np.where(drawn, np.exp(lp_d), 0.0), lp_d, tail, lp_dtype, rep)
