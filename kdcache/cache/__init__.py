"""The teacher cache: a Zarr v3 group of ragged per-sample teacher targets (see README.md).

Knows arrays and schemas, not models: it takes and gives ``kdcache.records.TeacherRecord``.
"""

from kdcache.cache.format import (
    FORMAT_VERSION,
    REASON_CODES,
    REASON_NAMES,
    CacheCorrupt,
    CacheFormatError,
    CacheMismatch,
    Layout,
    check_compatible,
    load_schema,
    make_attrs,
    validate_attrs,
)
from kdcache.cache.reader import CacheDataset, CacheReader, global_order
from kdcache.cache.writer import CacheWriter, open_writer

__all__ = [
    "FORMAT_VERSION",
    "REASON_CODES",
    "REASON_NAMES",
    "CacheCorrupt",
    "CacheDataset",
    "CacheFormatError",
    "CacheMismatch",
    "CacheReader",
    "CacheWriter",
    "Layout",
    "check_compatible",
    "global_order",
    "load_schema",
    "make_attrs",
    "open_writer",
    "validate_attrs",
]
