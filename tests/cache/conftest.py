"""Fixtures of the cache tests (helpers live in ``helpers.py``)."""

from __future__ import annotations

import pytest

from .helpers import make_record


@pytest.fixture(scope="module")
def records():
    """40 consistent random records (rows 0..39), bf16 hidden, fp16 log-probs."""
    return [make_record(i) for i in range(40)]
