"""The cache format: names, dtypes, codecs, attributes, checksums. No I/O beyond reading the schema.

One cache is one Zarr v3 group (see ``kdcache/cache/README.md``)::

    <cache>/zarr.json                      root attributes (validated by the JSON Schema)
    <cache>/teacher_gram                   float32 [D, D]  M_t = W^T W of the teacher's LM head
    <cache>/teacher_lm_head                [V, D] the LM head W itself (targets hidden only)
    <cache>/parts/<rank>/<data array>      ragged, flat, no padding (DATA_ARRAYS)
    <cache>/parts/<rank>/index/<name>      one row per sample, committed or skipped (INDEX_ARRAYS)

Everything here is a pure function of its arguments (beyond reading the schema and a node's
``zarr.json``) so the writer, reader, verifier and tests share one definition of the layout:
array names and axes, the checksum order, the bf16 storage helpers.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kdcache import __version__
from kdcache.positions import parse_kinds
from kdcache.target_kinds import Topk, parse_targets

FORMAT_VERSION = 1
GRAM_ARRAY = "teacher_gram"
LM_HEAD_ARRAY = "teacher_lm_head"  # [V, D] the teacher's LM head (targets hidden), rank 0
SCHEMA_RESOURCE = "schemas/cache_attrs.schema.json"

# Root attribute keys that may change between runs of one cache without changing its meaning.
# ``codecs`` is informational: on resume the existing arrays keep their own codecs.
VOLATILE_KEYS = frozenset({"kdcache_version", "codecs"})
# Attributes that say where an input was found, not what it is. Compatibility is decided by the
# content keys beside them (dataset sha256 and num_rows; the teacher's config and weights hashes;
# the tokenizer's vocabulary and template hashes): ``./data/x.json`` and ``data/x.json``, or a
# dataset or teacher directory moved from the dump box to a training machine, are the same cache.
# The cache keeps the spelling of the run that created it.
LOCATION_KEYS = frozenset({"dataset.path", "teacher.name_or_path", "tokenizer.name_or_path"})

# ---- per-sample status codes (index/status) --------------------------------------------------
STATUS_OK = 0
REASON_CODES = {
    "missing_image": 1,
    "corrupt_image": 2,
    "no_image_token": 3,
    "repeated_image_token": 4,
    "no_response": 5,
    "empty_response": 6,
    "too_long": 7,
    "other": 255,
}
REASON_NAMES = {v: k for k, v in REASON_CODES.items()}

# ---- arrays ----------------------------------------------------------------------------------
# Data arrays of a part; the first axis is the ragged one ("T" tokens, "P" distilled positions,
# "V" visual rows, "B" sample-id bytes, "E" entries of variable-k targets). Width: None = 1-D,
# "k" = top-k, "D" = hidden size. Which of them a part holds is its settings' (``data_array_names``):
# the target kind's (``kdcache.target_kinds``) and the relation mode's.
TOKEN_ARRAYS = ("input_ids", "roles")
POSITION_ARRAYS = ("positions", "kinds", "topk_ids", "topk_logprobs", "tail_logmass", "sample_counts",
                   "position_hidden", "topp_counts")
VISUAL_ARRAYS = ("visual_hidden", "visual_factor")  # visual_factor [V, R]: relation lowrank:R, instead
ID_ARRAYS = ("sample_id_bytes",)
ENTRY_ARRAYS = ("topp_ids", "topp_logprobs")  # targets topp: the kept ids of every position, flat
DATA_ARRAYS = TOKEN_ARRAYS + POSITION_ARRAYS + VISUAL_ARRAYS + ID_ARRAYS + ENTRY_ARRAYS
# The order in which a sample's arrays enter its checksum (``sample_checksum``); a part holds the
# ones its settings store (``data_array_names``). sample_id_bytes is covered as the id itself.
CHECKSUM_ORDER = ("input_ids", "roles", "positions", "kinds", "topk_ids", "topk_logprobs", "tail_logmass",
                  "topp_counts", "topp_ids", "topp_logprobs",
                  "visual_hidden", "sample_counts", "position_hidden", "visual_factor")
AXIS_OF = {
    **{a: "tokens" for a in TOKEN_ARRAYS},
    **{a: "positions" for a in POSITION_ARRAYS},
    **{a: "visual" for a in VISUAL_ARRAYS},
    **{a: "id_bytes" for a in ID_ARRAYS},
    **{a: "entries" for a in ENTRY_ARRAYS},
}
TOTAL_KEYS = ("tokens", "positions", "visual", "id_bytes")  # the axes of every cache (``axes``: and its kind's)
# axis -> (offset index column, length index column) of a sample (positions: counts.sum(1))
AXIS_INDEX = {
    "tokens": ("token_offset", "num_tokens"),
    "positions": ("pos_offset", None),
    "visual": ("vis_offset", "num_visual"),
    "id_bytes": ("id_offset", "id_len"),
    "entries": ("entry_offset", "num_entries"),
}

# Index arrays (under parts/<rank>/index/): name -> (dtype, width or None).
INDEX_ARRAYS: dict[str, tuple[str, int | None]] = {
    "row": ("int64", None),
    "status": ("uint8", None),
    "token_offset": ("int64", None),
    "num_tokens": ("int32", None),
    "pos_offset": ("int64", None),
    "counts": ("int32", 3),  # positions per kind: prompt, visual, response
    "vis_offset": ("int64", None),
    "num_visual": ("int32", None),
    "id_offset": ("int64", None),
    "id_len": ("int32", None),
    "checksum": ("uint32", None),
}
# Index arrays of one relation mode only (``index_arrays``): relation lowrank:R records the relative
# Gram error of each sample's factor (float32, 0 for skipped samples).
RELATION_INDEX_ARRAYS: dict[str, tuple[str, int | None]] = {"relation_error": ("float32", None)}

HIDDEN_STORAGE = {"bf16": "uint16", "fp16": "float16", "float32": "float32"}
HIDDEN_LOGICAL = {"bf16": "bfloat16", "fp16": "float16", "float32": "float32"}
# arrays whose shards follow their own row bytes (rows of 2-4 D bytes), not topk_ids' shard rows
OWN_SHARD_ARRAYS = ("visual_hidden", "position_hidden", "visual_factor")


class CacheMismatch(ValueError):
    """A cache does not fit what this run asks for: an existing cache made with other settings or
    fingerprints (dump), or a cache made for another tokenizer, template, vocabulary, data file
    or loss (train, eval)."""


class CacheFormatError(ValueError):
    """The cache on disk does not follow the format (bad attributes, missing arrays, version)."""


class CacheCorrupt(ValueError):
    """Stored bytes fail a check (checksum, decode error) for a named part/sample/array."""


@dataclass(frozen=True)
class Layout:
    """Chunking of the arrays: rows per chunk/shard are derived from byte targets per array.

    A chunk is the unit of compression and of a read (~1-4 MB suits streaming); a shard is one
    file holding many chunks (~16-64 MB keeps the file count low). ``shard_bytes`` is rounded to
    a whole number of chunks. Index arrays are small and rewritten at every commit, so they are
    chunked by rows and not sharded.
    """

    chunk_bytes: int = 2 << 20
    shard_bytes: int = 32 << 20
    index_chunk_rows: int = 16384

    def rows(self, row_bytes: int) -> tuple[int, int]:
        """(chunk_rows, shard_rows) for an array whose rows are ``row_bytes`` long."""
        chunk_rows = max(1, self.chunk_bytes // max(1, row_bytes))
        per_shard = max(1, self.shard_bytes // (chunk_rows * max(1, row_bytes)))
        return chunk_rows, chunk_rows * per_shard


@dataclass(frozen=True)
class ArraySpec:
    """How one data array is stored: dtype on disk, width of a row, chunking, compressor."""

    name: str
    dtype: str  # storage dtype
    width: int | None  # None = 1-D
    chunk_rows: int
    shard_rows: int | None
    compressor: str  # a key of CLEVEL: "bitshuffle", "byteshuffle", "byteshuffle-fast", "zstd", "delta-zstd"
    logical_dtype: str | None = None  # e.g. "bfloat16" stored as uint16 bit patterns
    aligned: bool = False  # big array: the writer writes it in whole shards only

    @property
    def row_shape(self) -> tuple[int, ...]:
        return () if self.width is None else (self.width,)

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * (self.width or 1)


def _divisor_chunk(shard_rows: int, max_rows: int) -> int:
    """Largest divisor of ``shard_rows`` that is <= ``max_rows`` (chunks must tile a shard)."""
    d = max(1, -(-shard_rows // max(1, max_rows)))
    while shard_rows % d:
        d += 1
    return shard_rows // d


def targets_of(settings: dict) -> Topk:
    """``settings['targets']`` parsed: its target kind (``kdcache.target_kinds``), bound to the
    settings (e.g. topp's K = settings.top_k)."""
    return parse_targets(settings["targets"]).bound(settings)


def relation_of(settings: dict):
    """``settings['relation']`` parsed: its relation mode (``kdcache.relation``), as stored
    (``hidden`` with hidden ``none``, written by caches made before the option, is ``none``)."""
    from kdcache.relation import parse_relation

    return parse_relation(settings["relation"]).stored(settings["hidden"])


def rebuilds_visual_hidden(settings: dict) -> bool:
    """Whether the reader rebuilds ``visual_hidden`` from ``position_hidden`` instead of reading it:
    relation ``hidden`` with ``targets: hidden`` when both visual and response positions are
    distilled. Every output in the image span is then a distilled position (kind visual, or
    response for the last one when a caption follows the image at once), so storing the rows twice
    is waste. With ``visual`` but not ``response`` that last output would be missing."""
    kinds = set(settings["positions"])
    return (relation_of(settings).name == "hidden" and targets_of(settings).exact
            and {"visual", "response"} <= kinds)


def stores_visual_hidden(settings: dict) -> bool:
    """Whether parts hold a ``visual_hidden`` array: with relation ``hidden`` only (``none``
    stores no relation targets, ``lowrank:R`` a ``visual_factor`` instead), and not when the
    reader rebuilds the rows (``rebuilds_visual_hidden``). Caches made before ``relation`` was a
    dump option have relation ``none`` exactly when ``hidden`` is ``none``, so this is unchanged
    for them."""
    return relation_of(settings).name == "hidden" and not rebuilds_visual_hidden(settings)


def axes(settings: dict) -> tuple[str, ...]:
    """The ragged axes of a part under ``settings``: ``TOTAL_KEYS`` and the target kind's own
    (``entries`` for targets topp). A part's commit record holds one total per axis."""
    return TOTAL_KEYS + tuple(targets_of(settings).extra_axes)


def index_arrays(settings: dict) -> dict[str, tuple[str, int | None]]:
    """Index arrays of a part under ``settings``: ``INDEX_ARRAYS``, the offset and length columns
    of the target kind's own axes (``AXIS_INDEX``), and ``relation_error`` with relation lowrank:R."""
    extra = relation_of(settings).index_arrays()
    own = {}
    for axis in targets_of(settings).extra_axes:
        off, ln = AXIS_INDEX[axis]
        own.update({off: ("int64", None), ln: ("int32", None)})
    return {**INDEX_ARRAYS, **own, **extra}


def data_array_names(settings: dict) -> list[str]:
    """Data arrays a part holds under ``settings`` (sample_id_bytes excluded), in checksum order
    (``CHECKSUM_ORDER``): input_ids, roles, positions, kinds, the target kind's arrays (topk_ids,
    topk_logprobs, tail_logmass [, sample_counts | position_hidden]), [visual_hidden],
    [visual_factor], sorted into that order."""
    names = {"input_ids", "roles", "positions", "kinds"}
    names.update(row[0] for row in targets_of(settings).arrays(settings, 0))
    if stores_visual_hidden(settings):
        names.add("visual_hidden")
    if relation_of(settings).factored:
        names.add("visual_factor")
    return [n for n in CHECKSUM_ORDER if n in names]


def data_specs(settings: dict, hidden_size: int, layout: Layout) -> dict[str, ArraySpec]:
    """Specs of the data arrays of a part, from the cache settings (``data_array_names``): visual
    hidden states absent when ``settings['hidden'] == 'none'`` (or rebuilt from position_hidden,
    ``stores_visual_hidden``); ``sample_counts`` uint16 [P, N] for ``targets: sampled:N`` (N =
    top_k); ``position_hidden`` [P, D] in the hidden dtype for ``targets: hidden``;
    ``visual_factor`` [V, R] in the hidden dtype for ``relation: lowrank:R``.

    Shard rows are shared by all arrays of the token, position and id axes (taken from the widest
    array, ``topk_ids``, at ``shard_bytes``): tokens and positions per sample are similar, so
    those arrays cross shard boundaries together, and the narrow ones (ids, roles, tails...) get
    shards small enough (<= ``chunk_bytes``, one chunk) to be rewritten cheaply at each commit.
    Big arrays (``aligned``) are only ever written in whole shards, except at flush/close.
    """
    k = int(settings["top_k"])
    kind = targets_of(settings)
    if kind.exact and settings["hidden"] == "none":
        raise CacheFormatError("settings.targets 'hidden' stores hidden states at every position, but "
                               "settings.hidden is 'none': choose bf16, fp16 or float32")
    table: list[tuple[str, str, int | None, str, str | None]] = [
        ("input_ids", "int32", None, "bitshuffle", None),
        ("roles", "uint8", None, "bitshuffle", None),
        ("positions", "int32", None, "bitshuffle", None),
        ("kinds", "uint8", None, "bitshuffle", None),
        *kind.arrays(settings, hidden_size),
        ("sample_id_bytes", "uint8", None, "bitshuffle", None),
    ]
    h = settings["hidden"]
    logical = HIDDEN_LOGICAL[h] if h == "bf16" else None
    # hidden states barely compress (~1.3x); zstd level 1 encodes ~2.4x faster than level 3
    if stores_visual_hidden(settings):
        table.append(("visual_hidden", HIDDEN_STORAGE[h], hidden_size, "byteshuffle-fast", logical))
    rank = relation_of(settings).rank
    if rank is not None:  # the factor's columns are as noisy as hidden states: the fast level too
        table.append(("visual_factor", HIDDEN_STORAGE[h], rank, "byteshuffle-fast", logical))
    _, shared_shard = layout.rows(4 * k)  # rows of a topk_ids shard
    specs = {}
    for name, dtype, width, comp, logical in table:
        row_bytes = np.dtype(dtype).itemsize * (width or 1)
        if name in OWN_SHARD_ARRAYS:
            chunk_rows, shard_rows = layout.rows(row_bytes)
        else:
            shard_rows = shared_shard
            chunk_rows = _divisor_chunk(shard_rows, max(1, layout.chunk_bytes // row_bytes))
        aligned = shard_rows * row_bytes > layout.chunk_bytes
        specs[name] = ArraySpec(name, dtype, width, chunk_rows, shard_rows, comp, logical, aligned)
    return specs


def index_specs(layout: Layout, settings: dict) -> dict[str, ArraySpec]:
    """Specs of the per-sample index arrays (``index_arrays(settings)``; chunked by rows, not
    sharded)."""
    return {
        name: ArraySpec(name, dtype, width, layout.index_chunk_rows, None, "byteshuffle")
        for name, (dtype, width) in index_arrays(settings).items()
    }


def zarr_compressors(spec: ArraySpec) -> list:
    """The compressor chain of an array, then crc32c so a flipped byte fails the read instead of
    returning garbage. Chosen by measurement on the trained demo teacher's k = 64 cache
    (``bench/cache_size.py``; bytes per position): top-k ids plain zstd-3 73 (blosc zstd-3 with
    bit-shuffle 86: shuffling breaks up the ids that neighbouring positions share), float16
    log-probs as delta-coded bit patterns + zstd-3 45 (blosc byte-shuffle 69); other integers
    blosc zstd-3 with bit-shuffle, other floats blosc zstd with byte-shuffle."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if spec.compressor in ("zstd", "delta-zstd"):
        return [ZstdCodec(level=CLEVEL[spec.compressor]), Crc32cCodec()]
    shuffle = "bitshuffle" if spec.compressor == "bitshuffle" else "shuffle"
    return [BloscCodec(cname="zstd", clevel=CLEVEL[spec.compressor], shuffle=shuffle),
            Crc32cCodec()]


def zarr_filters(spec: ArraySpec) -> list | None:
    """Array-to-array filters: numcodecs' Delta for ``delta-zstd`` (zarr-python >= 3.1.3 reads it
    through ``zarr.codecs.numcodecs``; it is not a core Zarr v3 codec), else none."""
    if spec.compressor != "delta-zstd":
        return None
    import warnings

    from zarr.codecs.numcodecs import Delta

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        return [Delta(dtype=np.dtype(spec.dtype).str)]


CLEVEL = {"bitshuffle": 3, "byteshuffle": 3, "byteshuffle-fast": 1, "zstd": 3, "delta-zstd": 3}
COMPRESSOR_NAMES = {"bitshuffle": "blosc-zstd-3-bitshuffle", "byteshuffle": "blosc-zstd-3-byteshuffle",
                    "byteshuffle-fast": "blosc-zstd-1-byteshuffle", "zstd": "zstd-3",
                    "delta-zstd": "delta-zstd-3"}


def codec_table(settings: dict, hidden_size: int, layout: Layout) -> dict[str, dict]:
    """The ``codecs`` root attribute: one entry per array path under ``parts/<rank>/``."""
    out = {}
    specs = {**data_specs(settings, hidden_size, layout)}
    specs.update({f"index/{n}": s for n, s in index_specs(layout, settings).items()})
    for path, s in specs.items():
        entry = {
            "dtype": s.dtype,
            "chunk_rows": s.chunk_rows,
            "shard_rows": s.shard_rows,
            "compressor": COMPRESSOR_NAMES[s.compressor],
            "crc32c": True,
        }
        if s.logical_dtype:
            entry["logical_dtype"] = s.logical_dtype
        out[path] = entry
    return out


# ---- attributes ------------------------------------------------------------------------------
def read_json_attrs(node_dir, key: str = "") -> dict | None:
    """Attributes of a zarr v3 node straight from its ``zarr.json``, or None if not there yet.
    ``node_dir``: a local directory, or a cache location (anything ``cache_location`` takes) with
    the node's ``key`` under it (``parts/0``)."""
    from kdcache.cache.store import cache_location

    loc = cache_location(node_dir)
    name = f"{key}/zarr.json" if key else "zarr.json"
    meta = loc.key(name)
    try:
        raw = loc.read_bytes(name)
        if raw is None:
            return None
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise CacheFormatError(f"{meta}: not valid JSON ({type(e).__name__}: {e}); the cache is damaged: "
                               "run `kdcache verify` and re-dump it") from e
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise CacheFormatError(f"{meta}: 'attributes' is not a JSON object; the cache is damaged: "
                               "run `kdcache verify` and re-dump it")
    return attrs


def load_schema() -> dict:
    """The JSON Schema of the root attributes, shipped in the wheel under ``kdcache/schemas``."""
    text = resources.files("kdcache").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


def validate_attrs(attrs: dict, *, where: str = "cache attributes") -> None:
    """Raise CacheFormatError naming the offending key if ``attrs`` breaks the schema or the
    format version is not one this code reads."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(attrs), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        raise CacheFormatError(f"{where} do not match the cache schema: " + "; ".join(msgs))
    if attrs["kdcache_format"] != FORMAT_VERSION:
        raise CacheFormatError(
            f"{where}: cache format {attrs['kdcache_format']} is not supported by this kdcache "
            f"({__version__}, format {FORMAT_VERSION}); use a matching kdcache or re-dump the cache"
        )
    if list(attrs["settings"]["positions"]) != list(parse_kinds(attrs["settings"]["positions"])):
        raise CacheFormatError(
            f"{where}: settings.positions {attrs['settings']['positions']} must be in canonical "
            "order prompt, visual, response"
        )
    _check_targets(attrs["settings"], where)


def _check_targets(settings: dict, where: str) -> None:
    """What the schema cannot say about settings.targets: N's range, top_k = N, draw_seed present
    exactly for sampled, and hidden states for the exact mode."""
    try:
        kind = parse_targets(settings["targets"])
    except ValueError as e:
        raise CacheFormatError(f"{where}: settings.{e}") from None
    kind.check_settings(settings, where, CacheFormatError)
    _check_relation(settings, where)


def _check_relation(settings: dict, where: str) -> None:
    """What the schema cannot say about settings.relation: its mode's ``check_settings``
    (``lowrank:R`` needs a hidden dtype and refuses ``targets: hidden``)."""
    relation_of(settings).check_settings(settings, where, CacheFormatError, targets_of(settings).exact)


def make_attrs(
    teacher: dict, tokenizer: dict, dataset: dict, settings: dict, *, layout: Layout | None = None
) -> dict:
    """Root attributes of a new cache from the caller's fingerprints and settings, validated.

    ``settings['positions']`` may be any spelling ``parse_kinds`` accepts; it is stored as a
    canonical list. ``layout`` (default ``Layout()``) only fills the informational ``codecs``.
    """
    settings = copy.deepcopy(dict(settings))
    settings["positions"] = list(parse_kinds(settings["positions"]))
    attrs = {
        "kdcache_format": FORMAT_VERSION,
        "kdcache_version": __version__,
        "teacher": copy.deepcopy(dict(teacher)),
        "tokenizer": copy.deepcopy(dict(tokenizer)),
        "dataset": copy.deepcopy(dict(dataset)),
        "settings": settings,
        "codecs": {},
    }
    # validate before codec_table so a missing hidden_size/top_k is a schema error, not a KeyError
    validate_attrs(attrs, where="new cache attributes")
    attrs["codecs"] = codec_table(settings, int(teacher["hidden_size"]), layout or Layout())
    validate_attrs(attrs, where="new cache attributes")
    return attrs


def attr_differences(existing: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences ``"settings.top_k: cache has 64, this run asks 32"``, skipping
    VOLATILE_KEYS at the top level and the LOCATION_KEYS (paths: content keys decide)."""
    missing = "<missing>"
    if isinstance(existing, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(existing) | set(new)):
            if not prefix and key in VOLATILE_KEYS:
                continue
            path = f"{prefix}.{key}" if prefix else key
            if path in LOCATION_KEYS:
                continue
            if key not in existing or key not in new:
                a = existing.get(key, missing)
                b = new.get(key, missing)
                diffs.append(f"{path}: cache has {a!r}, this run asks {b!r}")
            else:
                diffs += attr_differences(existing[key], new[key], path)
        return diffs
    if isinstance(existing, (list, tuple)) and isinstance(new, (list, tuple)):
        existing, new = list(existing), list(new)
    if existing != new:
        return [f"{prefix}: cache has {existing!r}, this run asks {new!r}"]
    return []


def check_compatible(existing_attrs: dict, new_attrs: dict) -> None:
    """Raise CacheMismatch naming every differing key unless the two attribute sets describe the
    same cache (volatile keys such as ``kdcache_version`` ignored)."""
    diffs = attr_differences(existing_attrs, new_attrs)
    if diffs:
        raise CacheMismatch(
            "the existing cache was made with different settings: "
            + "; ".join(diffs)
            + " (use a new cache path, or rerun with the cache's settings)"
        )


# ---- per-sample encoding ---------------------------------------------------------------------
# Zarr has no bfloat16: bf16 rows are stored as their uint16 bit patterns with logical_dtype
# "bfloat16"; float16 log-probs as uint16 bits too (delta-coded), logical_dtype "float16".
def hidden_to_storage(h, mode: str) -> np.ndarray:
    """[N, D] tensor -> stored numpy array in hidden mode ``mode``: bf16 as its uint16 bit pattern,
    fp16 / float32 native."""
    import torch

    h = h.detach().cpu().contiguous()
    if mode == "bf16":
        return h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return h.to(torch.float16 if mode == "fp16" else torch.float32).numpy()


def storage_view(a: np.ndarray, logical: str | None) -> np.ndarray:
    """Stored rows -> their logical numpy dtype where numpy has it: float16 kept as uint16 bits
    (delta-coded log-probs) is viewed back as float16 (no copy); anything else as stored."""
    return a.view(np.float16) if logical == "float16" else a


def hidden_from_storage(a: np.ndarray, logical: str | None):
    """Stored hidden rows -> tensor; uint16 with logical_dtype bfloat16 -> torch.bfloat16."""
    import torch

    if logical == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact): the bits are the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def sample_checksum(row: int, sample_id: str | bytes, arrays: list[np.ndarray]) -> int:
    """crc32 (zlib) of one sample: its dataset row as a little-endian int64, its sample id's utf-8
    bytes, then the little-endian bytes of its arrays as stored (``checksum_arrays`` order), so a
    sample moved to another row or renamed fails its check like changed data does.
    ``sample_id`` may be the stored bytes themselves (verify passes them undecoded)."""
    sid = sample_id.encode("utf-8") if isinstance(sample_id, str) else bytes(sample_id)
    crc = zlib.crc32(np.asarray(row, dtype="<i8").tobytes())
    crc = zlib.crc32(sid, crc)
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        # a byte view of the flat array: memoryview.cast refuses zero-length shapes (a text-only
        # sample's [0, D] visual rows), which contribute no bytes
        crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
    return crc & 0xFFFFFFFF


def checksum_arrays(arrays: dict[str, np.ndarray | None]) -> list[np.ndarray]:
    """The arrays of one sample covered by its checksum, in ``CHECKSUM_ORDER``: ``arrays`` maps
    array names to their rows as stored (extra names such as sample_id_bytes are not covered;
    absent or None ones are skipped). The index's ``relation_error`` is not covered (index chunks
    have their own crc32c)."""
    return [arrays[n] for n in CHECKSUM_ORDER if arrays.get(n) is not None]


def logprob_tolerance(p: np.ndarray, lp: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Allowed |sum(exp(topk)) + exp(tail) - 1| per position for log-probs stored in ``dtype``.

    Rounding a log-prob l to a float with unit roundoff u moves exp(l) by about
    exp(l) * |l| * u, so the sum moves by at most u * sum_i p_i |l_i|; the 1e-4 floor covers the
    teacher's own float32 softmax and the float32 tail.
    p, lp: [P, k] -> [P]
    """
    u = float(np.finfo(dtype).eps) / 2
    return 2.0 * u * np.sum(p * np.abs(lp), axis=-1) + 1e-4 + 4 * u


def ceil_to(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)
