"""Teachers and students: standard Hugging Face LLaVA checkpoint directories.

A model is what ``llava-hf/*`` checkpoints are: ``LlavaForConditionalGeneration`` config and
safetensors weights, the tokenizer with its chat template, and a ``LlavaProcessor`` (SigLIP
image processor, ``patch_size``, ``vision_feature_select_strategy``). ``load_model`` takes

* a local directory (any such directory, also one built with plain transformers classes),
* a Hugging Face id of an assembled LLaVA checkpoint (``llava-hf/llava-interleave-qwen-0.5b-hf``),
* a short alias (``qwen2.5-0.5b``) naming an LLM + ``google/siglip-so400m-patch14-384`` pair;
  an alias is not yet a LLaVA model: ``kdcache init-model`` assembles it (fresh projector).

``init_model`` assembles a model TinyLLaVA-style (pretrained LLM + vision tower + a fresh GELU
projector, ``vision_feature_layer=-2``, ``vision_feature_select_strategy="full"``), or from a
preset: ``tiny-*`` presets are random-init and take seconds on a CPU (tests, demo);
``random:<alias>`` presets have the real shapes with random weights (benchmarks).

Command: ``kdcache init-model --preset tiny-teacher --tokenizer data/tokenizer --out models/teacher``
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

VISION_ID = "google/siglip-so400m-patch14-384"
IMAGE_TOKEN = "<image>"
META_FILE = "kdcache_meta.json"  # kdcache's training history beside a checkpoint; optional

ALIASES: dict[str, str] = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen1.5-0.5b": "Qwen/Qwen1.5-0.5B",
    "qwen1.5-1.8b": "Qwen/Qwen1.5-1.8B",
    "qwen1.5-4b": "Qwen/Qwen1.5-4B",
    "qwen1.5-7b": "Qwen/Qwen1.5-7B",
}

# Real shapes (from the public config.json files) for random-init models: benchmarks only.
QWEN_SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
}
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, image_size=384, patch_size=14)

# Tiny presets: the LLM sizes of the demo (issue 6); one vision tower shared by all of them
# (same seed, same weights), 64x64 images in 16 patches of 16x16 -> 16 visual tokens.
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, image_size=64, patch_size=16)
TINY_VISION_SEED = 1234
# Their weights start at std 1/sqrt(hidden) (``initializer_range``), not Qwen2's 0.02, which is
# meant for widths of 896 and more: at width 64-192 it leaves the image's contribution to the
# answer so small that the LLM first learns each question type's answer prior and stays on that
# plateau (colour at chance after 1,125 teacher steps). Measured in the demo lane's notes (issue 20).
TINY_LLM: dict[str, dict] = {
    "tiny-teacher": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, initializer_range=192 ** -0.5),
    "tiny-assistant": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=128 ** -0.5),
    "tiny-student": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=64 ** -0.5),
}
PRESETS = tuple(TINY_LLM) + tuple(f"random:{a}" for a in QWEN_SHAPES)


# Below this size a model loads or saves in well under a second: transformers' per-tensor
# progress bars ("Loading weights", "Writing model shards") would be noise around kdcache's own.
QUIET_BARS_BELOW_BYTES = 256 * 2**20


@contextlib.contextmanager
def hf_bars_unless_large(nbytes: int):
    """transformers' progress bars off while a model of ``nbytes`` below ``QUIET_BARS_BELOW_BYTES``
    loads or saves (restored after)."""
    from transformers.utils import logging as hf_logging

    if nbytes >= QUIET_BARS_BELOW_BYTES or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


class _OnePilNote(logging.Filter):
    """Without torchvision transformers falls back to the PIL image processor (what kdcache
    expects here: no torchvision matches the CPU torch) and says so on every process's first
    load; kdcache says it once, in the README, so the warning is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_OnePilNote())


def _weights_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def model_bytes(model) -> int:
    """Bytes of a model's parameters (what ``save_pretrained`` writes, about)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points: a local dir, a hub id, or an alias (LLM id + vision id)."""

    kind: str  # "dir" | "hub" | "alias"
    name: str
    llm_id: str | None = None
    vision_id: str | None = None


def resolve(name: str) -> ModelSource:
    """Classify ``name``: an existing local path, a known alias, or a Hugging Face id."""
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} exists but has no config.json: not a Hugging Face model directory")
        return ModelSource("dir", str(p))
    key = name.lower()
    if key in ALIASES:
        return ModelSource("alias", name, llm_id=ALIASES[key], vision_id=VISION_ID)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"{name!r} is neither an existing directory, an alias ({', '.join(ALIASES)}) nor a "
            "Hugging Face id of the form owner/name"
        )
    if p.parent.is_dir():
        # 'runs/s-ptt' with a local runs/: a mistyped path, not the hub repo 'runs/s-ptt'
        near = difflib.get_close_matches(p.name, sorted(c.name for c in p.parent.iterdir() if c.is_dir()), n=3)
        raise ModelLoadError(
            f"no model directory {name}: {p.parent}/ exists here but holds no {p.name!r}"
            + (f" (did you mean {', '.join(str(p.parent / n) for n in near)}?)" if near else "")
            + f". Pass an existing directory (a Hugging Face id {name!r} would clash with the local {p.parent}/)"
        )
    return ModelSource("hub", name)


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_snapshot(repo_id: str, flag: str = "") -> str:
    """Local directory of a hub repo: the HF cache when it holds it, else a download.

    With no network this fails at once (not after transformers' retries) and says how to
    pass a local path instead.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE=1). Download it on a machine with network access "
            f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass the directory "
            + (f"instead, e.g. {flag} /path/to/DIR" if flag else "instead")
        )
    try:
        return snapshot_download(repo_id)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ModelLoadError(f"could not download {repo_id!r}: {e}. Pass a local directory instead.") from e


def model_dir(name: str, flag: str = "") -> str:
    """Local directory of an assembled LLaVA model (path or hub id). Aliases are refused.
    ``flag``: the option that named the model (``--student``), for the hints."""
    src = resolve(name)
    if src.kind == "alias":
        raise ModelLoadError(
            f"{name!r} is an alias for {src.llm_id} + {src.vision_id}, not an assembled LLaVA model. "
            f"Assemble it first: `kdcache init-model --llm {name} --out models/{name}`, train its "
            f"projector (`kdcache train --stage pt --student models/{name} ...`), then pass the directory."
        )
    return src.name if src.kind == "dir" else hub_snapshot(src.name, flag)


def default_dtype(device: torch.device) -> torch.dtype:
    """The one rule for a model's compute dtype when none is asked for: bf16 on CUDA, else float32
    (CPU bf16 matmuls are slow and lose precision for nothing)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, flag: str = ""):
    """Load ``(model, processor)`` from a LLaVA directory or hub id (see ``model_dir``; ``flag``
    names the option that gave ``name`` in the hints)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = model_dir(name, flag)
    try:
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with hf_bars_unless_large(_weights_bytes(path)):
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw)
        processor = AutoProcessor.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load a LLaVA model from {path}: {e}") from e
    return model.to(device), processor


def num_image_tokens(model_config, processor=None) -> int:
    """Visual tokens per image: patches, plus the processor's extra (CLS) tokens, minus one
    for ``vision_feature_select_strategy="default"`` (which drops the first feature)."""
    vc = model_config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    n += int(getattr(processor, "num_additional_image_tokens", 0) or 0) if processor is not None else 0
    if model_config.vision_feature_select_strategy == "default":
        n -= 1
    return n


def image_token_id(model_config) -> int:
    return int(model_config.image_token_id)


def read_meta(path: str | Path) -> dict:
    """kdcache's record of how a checkpoint was made; empty for checkpoints from elsewhere."""
    f = Path(path) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def write_meta(path: str | Path, meta: dict) -> None:
    f = Path(path) / META_FILE
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, f)


def projector_trained(path: str | Path) -> bool:
    """False only for a kdcache-assembled model whose projector no stage has trained yet."""
    return bool(read_meta(path).get("projector_trained", True))


def config_hash(model_config) -> str:
    d = model_config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        d.pop(k, None)
    for sub in ("text_config", "vision_config"):
        if isinstance(d.get(sub), dict):
            for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
                d[sub].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def text_hash(s: str | None) -> str:
    return hashlib.sha256((s or "").encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Assembly


def _processor_for(tokenizer, image_size: int, patch_size: int, strategy: str):
    from transformers import LlavaProcessor, SiglipImageProcessor

    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=strategy, chat_template=tokenizer.chat_template,
        num_additional_image_tokens=0,
    )


def _with_image_token(tokenizer):
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def llava_config(text_config, vision_config, image_token: int):
    """The kdcache LLaVA layout around given LLM and SigLIP configs: GELU projector,
    ``vision_feature_layer=-2``, ``vision_feature_select_strategy="full"`` (every patch a token)."""
    from transformers import LlavaConfig

    n = (vision_config.image_size // vision_config.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token,
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="full", image_seq_length=n,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _tiny_vision(dtype=torch.float32):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vc = SiglipVisionConfig(**TINY_VISION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_VISION_SEED)  # every tiny preset shares this exact tower
        tower = SiglipVisionModel(vc).to(dtype)
    return vc, tower


def init_model(out: str | Path, *, preset: str | None = None, llm: str | None = None,
               vision: str | None = None, tokenizer: str | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, max_position_embeddings: int = 4096) -> Path:
    """Assemble and save a LLaVA model directory; returns ``out``.

    preset ``tiny-*``: random tiny LLM + the shared tiny SigLIP tower, tokenizer required
    (``kdcache make-data`` writes one). preset ``random:<alias>``: real shapes, random weights,
    with ``tokenizer`` or a byte-level stand-in. Otherwise ``llm`` (alias, hub id or dir of a
    causal LM) + ``vision`` (SigLIP id or dir; default so400m), TinyLLaVA-style.
    """
    from transformers import (AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig, SiglipVisionModel)

    out = Path(out)
    torch.manual_seed(seed)
    meta = {"projector_trained": False, "stages": [], "assembled_from": {}}
    if preset is not None and preset in TINY_LLM:
        if tokenizer is None:
            raise ModelLoadError(f"preset {preset} needs --tokenizer (e.g. the one `kdcache make-data` writes)")
        tok = _with_image_token(AutoTokenizer.from_pretrained(tokenizer))
        vc, tower = _tiny_vision()
        tc = Qwen2Config(vocab_size=len(tok), max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TINY_LLM[preset])
        config = llava_config(tc, vc, tok.convert_tokens_to_ids(IMAGE_TOKEN))
        model = LlavaForConditionalGeneration(config)
        model.model.vision_tower.load_state_dict(tower.state_dict())
        meta["assembled_from"] = {"preset": preset, "tokenizer": str(tokenizer), "seed": seed}
    elif preset is not None and preset.startswith("random:") and preset[7:] in QWEN_SHAPES:
        alias = preset[7:]
        if tokenizer is not None:
            tok = _with_image_token(AutoTokenizer.from_pretrained(tokenizer))
        else:
            tok = None
        shape = dict(QWEN_SHAPES[alias])
        image_tok = shape["vocab_size"] - 1 if tok is None else tok.convert_tokens_to_ids(IMAGE_TOKEN)
        tc = Qwen2Config(max_position_embeddings=max_position_embeddings, **shape)
        vc = SiglipVisionConfig(**SIGLIP_SO400M)
        model = LlavaForConditionalGeneration(llava_config(tc, vc, image_tok)).to(dtype)
        meta["assembled_from"] = {"preset": preset, "seed": seed}
    elif preset is not None:
        raise ModelLoadError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    else:
        if llm is None:
            raise ModelLoadError("init-model needs --preset or --llm (alias, hub id or directory)")
        src = resolve(llm)
        llm_path = src.name if src.kind == "dir" else hub_snapshot(src.llm_id or src.name)
        vision = vision or (src.vision_id if src.kind == "alias" else VISION_ID)
        vsrc = resolve(vision)
        vision_path = vsrc.name if vsrc.kind == "dir" else hub_snapshot(vsrc.name)
        tok = _with_image_token(AutoTokenizer.from_pretrained(tokenizer or llm_path))
        lm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
        tower = SiglipVisionModel.from_pretrained(vision_path, dtype=dtype)
        config = llava_config(lm.config, tower.config, tok.convert_tokens_to_ids(IMAGE_TOKEN))
        model = LlavaForConditionalGeneration(config).to(dtype)
        model.model.vision_tower.load_state_dict(tower.state_dict())
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
        if len(tok) != lm.config.vocab_size:
            model.resize_token_embeddings(max(len(tok), lm.config.vocab_size))
        meta["assembled_from"] = {"llm": llm, "vision": vision}
    model.config.pad_token_id = tok.pad_token_id if tok is not None else None
    model.generation_config.pad_token_id = model.config.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    with hf_bars_unless_large(model_bytes(model)):
        model.save_pretrained(out, safe_serialization=True)
    if tok is not None:
        vc = model.config.vision_config
        _processor_for(tok, vc.image_size, vc.patch_size, "full").save_pretrained(out)
    write_meta(out, meta)
    return out
