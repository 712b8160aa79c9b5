"""Session-wide fixtures: one small synthetic dataset and two tiny random-init models, built once.

    synth_data    dict of paths from ``make_synthetic`` (root, images_root, captions, instruct,
                  val, eval, captions_small, instruct_small, tokenizer): 60 training images x 3
                  questions, 10 val, 20 eval, the first 20 images in ``*_small.json``
    tiny_teacher  Path of a ``tiny-teacher`` LLaVA directory, marked projector-trained (PT+SFT) so
                  the dump accepts it; its weights are random (tests need no trained teacher)
    tiny_student  Path of a fresh ``tiny-student`` LLaVA directory (projector untrained)
    s3_server     endpoint of a real S3-protocol server (moto) on 127.0.0.1, port 0 (tests/s3server.py)
    s3_url        ``s3://<fresh bucket>`` on it

Treat them as read-only: copy a model directory before changing it.

CPU threads: the tiny models' matmuls are far too small to gain from intra-op threads, and on a
shared, loaded machine OpenMP's spinning threads make them ~40x slower, so the session uses one
thread unless OMP_NUM_THREADS says otherwise; subprocesses get OMP_NUM_THREADS=1 from the
``cli_env`` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.s3server import s3_server, s3_url  # noqa: F401  (fixtures: a real S3 server, a fresh bucket)

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``kdcache`` subprocess: offline, one thread, no colour, plus ``extra``
    (tests get it as the ``cli_env`` fixture)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def cli_env():
    """``subprocess_env``: call it with extra variables, pass the result as ``env=``."""
    return subprocess_env


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict[str, Path]:
    from kdcache.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synth")
    return make_synthetic(root / "data", num_images=60, qa_per_image=3, num_val=10, num_eval=20,
                          student_images=20, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, synth_data) -> Path:
    from kdcache.models import init_model, read_meta, write_meta

    out = init_model(tmp_path_factory.mktemp("models") / "teacher", preset="tiny-teacher",
                     tokenizer=str(synth_data["tokenizer"]), seed=0)
    meta = read_meta(out)
    meta.update({"projector_trained": True, "stages": ["pt", "sft"]})
    write_meta(out, meta)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, synth_data) -> Path:
    from kdcache.models import init_model

    return Path(init_model(tmp_path_factory.mktemp("models") / "student", preset="tiny-student",
                           tokenizer=str(synth_data["tokenizer"]), seed=1))
