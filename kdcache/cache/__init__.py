"""The teacher cache: a Zarr v3 group of ragged per-sample teacher targets (see README.md).

Knows arrays and schemas, not models: it takes and gives ``kdcache.records.TeacherRecord``.
"""

import warnings

# The log-probs' delta filter is numcodecs' Delta, which zarr-python reads and writes but flags on
# every array open as outside the core Zarr v3 spec: said once in README.md instead.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

from kdcache.cache.format import (  # noqa: E402
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
from kdcache.cache.reader import CacheDataset, CacheReader, global_order  # noqa: E402
from kdcache.cache.writer import CacheWriter, open_writer  # noqa: E402

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
