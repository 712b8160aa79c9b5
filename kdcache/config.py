"""Typed configs: every default of every job lives here, once.

The CLI fills these from flags, a recipe (``pipelines/*.yaml``) from YAML; nothing else holds a
default. ``from_dict`` refuses unknown keys and wrong types with the key's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields

from .losses.divergences import DIVERGENCES, JSD_BETA, SKEW_ALPHA  # stdlib only, like this module

STAGES = ("pt", "dpt", "sft", "dft")
# Paper settings (LLaVA-KD, section 4.1): projector-only stages at 1e-3, full stages at 2e-5.
STAGE_LR = {"pt": 1e-3, "dpt": 1e-3, "sft": 2e-5, "dft": 2e-5}
TEMPLATES = ("chat", "qwen2_base", "pretrain")
# A sample longer than max_length: skip it (counted), stop the run, or cut its tail to max_length
# tokens as LLaVA's training does (still skipped when the cut would split the image or leave no
# response token). A truncating dump records ``truncate: true`` in the cache's settings and its
# trainer must truncate at the same max_length.
ON_TOO_LONG = ("skip", "error", "truncate")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


BACKENDS = ("hf", "vllm")  # who computes the dump's log-probs (kdcache.backends)
VLLM_DTYPES = ("bfloat16", "float16", "float32")
# vLLM's share of GPU memory when gpu_memory_utilization is None: vLLM's own default (0.9) when it
# has the GPU alone; 0.6 when the HF teacher shares it for the hidden states (weights + one
# prefix forward; vLLM refuses to start if less than its share is free).
VLLM_GPU_MEMORY_ALONE = 0.9
VLLM_GPU_MEMORY_WITH_HF = 0.6


@dataclass(frozen=True)
class VllmConfig:
    """Engine settings of the vLLM teacher backend (``DumpConfig.vllm``; ``kdcache dump --vllm-*``)."""

    tensor_parallel_size: int = 1  # GPUs the teacher is split over (vLLM's tensor parallelism)
    # Tokens per engine step. Keep it modest: prompt log-probs materialise full-vocabulary logits,
    # [max_num_batched_tokens, V] float32 (8192 x 151936 x 4 B = 5 GiB for Qwen2.5).
    max_num_batched_tokens: int = 8192
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32 (the HF copy is loaded in it too)
    # Fraction of GPU memory vLLM may take; None: VLLM_GPU_MEMORY_WITH_HF when hidden states are
    # dumped (the HF teacher is on the same GPU), else VLLM_GPU_MEMORY_ALONE.
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # None: the model's own context length
    # Hybrid mode: samples per HF hidden-state forward. vLLM wants large --batch-size chunks
    # (256); the HF prefix forward of that many would not fit beside vLLM, so it runs in slices.
    hf_batch_size: int = 16


def vllm_gpu_memory_utilization(cfg: "DumpConfig") -> float:
    """vLLM's GPU memory share for this dump (``VllmConfig.gpu_memory_utilization`` resolved)."""
    from .relation import parse_relation

    if cfg.vllm.gpu_memory_utilization is not None:
        return cfg.vllm.gpu_memory_utilization
    # the HF teacher shares the GPU exactly when relation targets are dumped (hybrid mode)
    alone = not parse_relation(cfg.relation).stored(cfg.hidden).has_targets
    return VLLM_GPU_MEMORY_ALONE if alone else VLLM_GPU_MEMORY_WITH_HF


@dataclass(frozen=True)
class DumpConfig:
    teacher: str
    data: str
    images: str
    out: str
    top_k: int = 64
    positions: tuple[str, ...] = ("visual", "response")
    hidden: str = "bf16"  # bf16 | fp16 | float32 | none  (dtype of the stored visual hidden states)
    # Relation targets for L_rel (kdcache.relation.parse_relation): hidden (the visual hidden states
    # in the hidden dtype; relation none when hidden is none) | none | lowrank:R (a rank-R factor F
    # of the logit Gram in the hidden dtype, F F^T ~ H W^T W H^T, and its error per sample; R = 64
    # by default: ~93 KB per sample in bf16 at N = 729 instead of ~2.9 MB).
    relation: str = "hidden"
    logprob_dtype: str = "float16"  # float16 | float32
    temperature: float = 1.0  # the dump's softmax temperature (KD temperature is the trainer's)
    # What is stored per position (kdcache.target_kinds.parse_targets): topk (top_k ids, log-probs, tail) |
    # hidden (top_k as topk + the LM head's input at every position + the LM head: exact) |
    # sampled:N (N draws from the teacher's distribution, Anshumann et al. 2025; top_k is not used)
    targets: str = "topk"
    draw_seed: int = 0  # seed of the sampled:N draws (sample with row r: generator seeded by (draw_seed, r))
    batch_size: int = 8
    max_length: int = 2048
    on_too_long: str = "skip"  # ON_TOO_LONG: skip | error | truncate
    template: str = "chat"  # chat | qwen2_base | pretrain
    chunk_size: int = 2048  # LM-head rows per chunk
    num_workers: int = 2  # data-loading processes (tokenise + decode images)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    commit_every_s: float = 60.0  # at most this much teacher work is redone after a crash (0: every batch)
    dist_timeout_s: float = 600.0  # how long a rank waits in a collective for a dead peer before failing
    # Batches per window of consecutive samples sorted by length before batching (less padding;
    # the cache is still written in row order); 1: batches in data order.
    bucket_batches: int = 16
    # Copy records to the host, compress and write them on a thread while the teacher runs the
    # next batch (False: in the main thread, one after the other).
    write_thread: bool = True
    # torch.compile the teacher's vision tower and LLM (kdcache.dump.compile_teacher): fused
    # norms, activations and rotary embeddings; dynamic sequence lengths, one compile per rank.
    compile: bool = False
    # hf: the reference (kdcache.teacher). vllm: log-probs from vLLM's prompt log-probs (tail from
    # the head, temperature 1, one process); hidden states, unless none, from an HF forward.
    backend: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)
    # How to reach an ``out`` URL (fsspec storage options, e.g. {endpoint_url: ..., anon: false});
    # credentials belong in the AWS_* variables or a profile, and are never written anywhere.
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LossConfig:
    """L = L_reg + alpha_res L_res + beta_vis L_vis + prompt_weight L_prompt + gamma_rel L_rel."""

    alpha_res: float = 1.0
    beta_vis: float = 1.0
    gamma_rel: float = 0.5
    prompt_weight: float = 0.0
    divergence: str = "fkl"  # kdcache.losses.divergences.DIVERGENCES: fkl | rkl | jsd | skl | srkl | tvd
    kd_temperature: float = 1.0
    jsd_beta: float = JSD_BETA  # beta of jsd
    skl_alpha: float = SKEW_ALPHA  # alpha of skl and srkl
    tail: bool = True  # False: renormalised top-k (no tail bucket)
    relation_features: str = "logits"  # logits | hidden
    relation_normalize: bool = False
    chunk_size: int = 1024  # positions per chunk in the fused LM-head + loss


@dataclass(frozen=True)
class TrainConfig:
    stage: str
    student: str
    data: str
    images: str
    out: str
    cache: str | None = None  # offline KD from a cache (the product)
    teacher: str | None = None  # online KD: the teacher runs beside the student (reference)
    template: str = "chat"
    max_length: int = 2048
    on_too_long: str = "skip"  # ON_TOO_LONG; a cache dumped with truncate needs truncate here, same max_length
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float | None = None  # None: the stage's paper rate (STAGE_LR)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    num_workers: int = 2
    block_size: int = 64  # samples per shuffle block (a whole-chunk read)
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    log_every: int = 10  # optimizer steps between metrics.jsonl lines (1: every step, for exactness tests)
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    on_nan: str = "skip"  # skip (drop the step's gradients, go on) | stop (raise; checkpoints intact)
    log_samples: bool = False  # out/samples-rank<r>.jsonl: the sample ids of every step (audit the order)
    dist_timeout_s: float = 600.0  # how long a rank waits in a collective for a dead peer before failing
    loss: LossConfig = field(default_factory=LossConfig)
    storage_options: dict = field(default_factory=dict)  # how to reach a ``cache`` URL (as DumpConfig's)
    # a ``cache`` URL: keep a local disk copy of every object fetched here, so later epochs and runs
    # fetch nothing (None: memory only, each object fetched once per worker and epoch)
    cache_dir: str | None = None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else STAGE_LR[self.stage]

    @property
    def distills(self) -> bool:
        return self.stage in ("dpt", "dft")


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    images: str
    out: str | None = None  # JSON report path
    teacher_cache: str | None = None
    teacher: str | None = None
    template: str = "chat"
    batch_size: int = 16
    max_new_tokens: int = 8
    max_length: int = 2048
    limit: int | None = None
    storage_options: dict = field(default_factory=dict)  # how to reach a ``teacher_cache`` URL


def validate(cfg) -> None:
    """Value checks shared by CLI and recipes; errors name the key."""
    if isinstance(cfg, TrainConfig):
        if cfg.stage not in STAGES:
            raise ConfigError(f"stage: {cfg.stage!r} is not one of {', '.join(STAGES)}")
        if cfg.distills and (cfg.cache is None) == (cfg.teacher is None):
            raise ConfigError(f"stage {cfg.stage} distils: give exactly one of cache (offline) or teacher (online)")
        if not cfg.distills and (cfg.cache or cfg.teacher):
            raise ConfigError(f"stage {cfg.stage} does not distil: drop cache/teacher (use dpt or dft)")
        if cfg.loss.divergence not in DIVERGENCES:
            raise ConfigError(f"loss.divergence: {cfg.loss.divergence!r} is not one of {', '.join(DIVERGENCES)}")
        if cfg.loss.relation_features not in ("logits", "hidden"):
            raise ConfigError("loss.relation_features must be logits or hidden")
        if cfg.on_nan not in ("skip", "stop"):
            raise ConfigError("on_nan must be skip or stop")
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        _one_of("template", cfg.template, TEMPLATES)
        _one_of("on_too_long", cfg.on_too_long, ON_TOO_LONG)
        _one_of("mixed_precision", cfg.mixed_precision, ("auto", "no", "bf16", "fp16"))
        for key in ("max_length", "log_every", "block_size"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
        for key in ("save_every", "num_workers", "weight_decay", "warmup_ratio", "min_lr_ratio", "max_grad_norm"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
        if not cfg.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {cfg.dist_timeout_s}")
        if cfg.max_steps is not None and cfg.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 (or null: use epochs), got {cfg.max_steps}")
        if cfg.max_steps is None and not cfg.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {cfg.epochs}")
        if cfg.lr is not None and not cfg.lr > 0:
            raise ConfigError(f"lr must be > 0 (or null: the stage's paper rate), got {cfg.lr}")
        lc = cfg.loss
        for key in ("alpha_res", "beta_vis", "gamma_rel", "prompt_weight"):
            if getattr(lc, key) < 0:
                raise ConfigError(f"loss.{key} must be >= 0, got {getattr(lc, key)}")
        if not lc.kd_temperature > 0:
            raise ConfigError(f"loss.kd_temperature must be > 0, got {lc.kd_temperature}")
        if not 0 <= lc.jsd_beta <= 1:
            raise ConfigError(f"loss.jsd_beta must lie in [0, 1], got {lc.jsd_beta}")
        if not 0 <= lc.skl_alpha < 1:
            raise ConfigError(f"loss.skl_alpha must lie in [0, 1), got {lc.skl_alpha}")
        if lc.chunk_size < 1:
            raise ConfigError(f"loss.chunk_size must be >= 1, got {lc.chunk_size}")
    if isinstance(cfg, DumpConfig):
        if cfg.hidden not in ("bf16", "fp16", "float32", "none"):
            raise ConfigError(f"hidden: {cfg.hidden!r} is not one of bf16, fp16, float32, none")
        if cfg.logprob_dtype not in ("float16", "float32"):
            raise ConfigError(f"logprob_dtype: {cfg.logprob_dtype!r} is not float16 or float32")
        if cfg.top_k < 1:
            raise ConfigError("top_k must be >= 1")
        _one_of("on_too_long", cfg.on_too_long, ON_TOO_LONG)
        if cfg.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {cfg.max_length}")
        if cfg.bucket_batches < 1:
            raise ConfigError(f"bucket_batches must be >= 1 (1: no length bucketing), got {cfg.bucket_batches}")
        from .target_kinds import parse_targets

        try:
            kind = parse_targets(cfg.targets)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
        if kind.exact and cfg.hidden == "none":
            raise ConfigError("targets: 'hidden' stores the hidden state at every position in the hidden dtype, "
                              "but hidden is 'none': choose hidden bf16, fp16 or float32")
        from .relation import parse_relation

        try:
            rel = parse_relation(cfg.relation)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
        if rel.factored and cfg.hidden == "none":
            raise ConfigError(f"relation: {cfg.relation!r} factors the visual hidden states and stores the factor in "
                              "the hidden dtype, but hidden is 'none': choose hidden bf16 (or fp16, float32)")
        if rel.factored and kind.exact:
            raise ConfigError(f"relation: {cfg.relation!r} with targets 'hidden': that mode stores every hidden state "
                              "of the image span already, so the factor would save nothing; use relation hidden, "
                              "or targets topk with the factor")
        if cfg.draw_seed < 0:
            raise ConfigError(f"draw_seed must be >= 0, got {cfg.draw_seed}")
        if not cfg.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {cfg.dist_timeout_s}")
        _one_of("backend", cfg.backend, BACKENDS)
        _one_of("vllm.dtype", cfg.vllm.dtype, VLLM_DTYPES)
        for key in ("tensor_parallel_size", "max_num_batched_tokens", "hf_batch_size"):
            if getattr(cfg.vllm, key) < 1:
                raise ConfigError(f"vllm.{key} must be >= 1, got {getattr(cfg.vllm, key)}")
        gmu = cfg.vllm.gpu_memory_utilization
        if gmu is not None and not 0 < gmu <= 1:
            raise ConfigError(f"vllm.gpu_memory_utilization must lie in (0, 1] (or null: auto), got {gmu}")
        if cfg.vllm.max_model_len is not None and cfg.vllm.max_model_len < 2:
            raise ConfigError(f"vllm.max_model_len must be >= 2 (or null: the model's), got {cfg.vllm.max_model_len}")


def _one_of(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_type(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _check_type(key, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    if tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    raise ConfigError(f"{key}: {value!r} is not a {getattr(tp, '__name__', tp)}")


def from_dict(cls, d: dict, prefix: str = ""):
    """Build a config dataclass from a plain dict; unknown keys and wrong types are errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    kw = {k: _check_type(prefix + k, v, hints[k]) for k, v in d.items()}
    missing = [f.name for f in fields(cls) if f.name not in kw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(prefix + m for m in missing)}")
    return cls(**kw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
