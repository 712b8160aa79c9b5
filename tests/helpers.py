"""Helpers several test modules share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from kdcache.config import DumpConfig
from kdcache.data.collate import LlavaTorchDataset, prepare_samples
from kdcache.data.llava import read_llava_json
from kdcache.dump import dump
from kdcache.models import image_token_id, num_image_tokens


def llava_dataset(model, processor, data_json: Path, images: Path, rows: int) -> LlavaTorchDataset:
    """The first ``rows`` samples of a LLaVA JSON, tokenised for ``model`` (chat template);
    every one must be kept."""
    samples = read_llava_json(data_json)[:rows]
    kept, toks, skipped = prepare_samples(
        samples, processor.tokenizer, images_root=images, template="chat", image_token_id=image_token_id(model.config),
        num_image_tokens=num_image_tokens(model.config, processor), max_length=2048, on_too_long="error")
    assert skipped.total == 0
    return LlavaTorchDataset.from_prepared(kept, toks, processor.image_processor, images)


def dump_small(teacher, synth_data: dict, out: Path, **kw) -> Path:
    """A dump of ``teacher`` over instruct_small into ``out`` (one process, batches of 8)."""
    return dump(DumpConfig(teacher=str(teacher), data=str(synth_data["instruct_small"]),
                           images=str(synth_data["images_root"]), out=str(out), num_workers=0, batch_size=8, **kw))
