"""Data layer: LLaVA JSON, conversation templates, the synthetic dataset, torch collation.

Imports nothing of kdcache.models; models pass in their tokenizer, image processor,
``image_token_id`` and ``num_image_tokens``.
"""

from kdcache.data.collate import ROLE_PAD, LlavaTorchDataset, collate, prepare
from kdcache.data.llava import (
    IMAGE_TOKEN,
    SKIP_REASONS,
    DataError,
    LlavaSample,
    SampleError,
    SkipCounter,
    check_image,
    load_image,
    parse_llava,
    read_llava_json,
    sample_to_json,
)
from kdcache.data.synthetic import make_split_subset, make_synthetic, train_tokenizer
from kdcache.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    Tokenized,
    image_placeholder_id,
    render_segments,
    template_fingerprint,
    tokenize_prompt,
    tokenize_sample,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "ROLE_PAD",
    "SKIP_REASONS",
    "TEMPLATES",
    "DataError",
    "LlavaSample",
    "LlavaTorchDataset",
    "SampleError",
    "SkipCounter",
    "Tokenized",
    "check_image",
    "collate",
    "image_placeholder_id",
    "load_image",
    "make_split_subset",
    "make_synthetic",
    "parse_llava",
    "prepare",
    "read_llava_json",
    "render_segments",
    "sample_to_json",
    "template_fingerprint",
    "tokenize_prompt",
    "tokenize_sample",
    "train_tokenizer",
]
