"""Typed configs: defaults live once, unknown keys and wrong types/values are errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest

from kdcache.config import (
    STAGE_LR,
    TEMPLATES,
    ConfigError,
    DumpConfig,
    EvalConfig,
    LossConfig,
    TrainConfig,
    from_dict,
    to_dict,
    validate,
)

REQUIRED = {"stage": "dft", "student": "s", "data": "d.json", "images": "img", "out": "o", "cache": "c.zarr"}


def train_cfg(**kw) -> TrainConfig:
    return from_dict(TrainConfig, {**REQUIRED, **kw})


def test_paper_defaults():
    lc = LossConfig()
    assert (lc.alpha_res, lc.beta_vis, lc.gamma_rel, lc.prompt_weight) == (1.0, 1.0, 0.5, 0.0)
    assert lc.divergence == "fkl" and lc.kd_temperature == 1.0 and lc.tail and lc.relation_features == "logits"
    assert STAGE_LR == {"pt": 1e-3, "dpt": 1e-3, "sft": 2e-5, "dft": 2e-5}
    cfg = train_cfg()
    assert cfg.learning_rate == 2e-5 and cfg.warmup_ratio == 0.03 and cfg.weight_decay == 0.0
    assert train_cfg(lr=5e-4).learning_rate == 5e-4
    assert cfg.distills and not train_cfg(stage="sft", cache=None).distills


def test_templates_match_the_tokeniser():
    from kdcache.data import templates

    assert TEMPLATES == templates.TEMPLATES


def test_round_trip_and_nested_loss():
    cfg = train_cfg(loss={"gamma_rel": 1, "divergence": "jsd"}, max_steps=3)
    assert cfg.loss == LossConfig(gamma_rel=1.0, divergence="jsd") and isinstance(cfg.loss.gamma_rel, float)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    d = DumpConfig(teacher="t", data="d", images="i", out="o", positions=("visual", "response"))
    assert from_dict(DumpConfig, to_dict(d)) == d


@pytest.mark.parametrize("bad, named", [
    ({"batch_sise": 4}, "batch_sise"),
    ({"loss": {"alpha": 1.0}}, "loss.alpha"),
    ({"batch_size": "4"}, "batch_size"),
    ({"batch_size": 4.0}, "batch_size"),
    ({"gradient_checkpointing": 1}, "gradient_checkpointing"),
    ({"max_steps": True}, "max_steps"),
    ({"loss": 1}, "loss"),
])
def test_unknown_keys_and_wrong_types_name_the_key(bad, named):
    with pytest.raises(ConfigError, match=named):
        train_cfg(**bad)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key.*out"):
        from_dict(TrainConfig, {k: v for k, v in REQUIRED.items() if k != "out"})


@pytest.mark.parametrize("bad, named", [
    ({"stage": "kd"}, "stage"),
    ({"cache": None}, "exactly one of cache"),
    ({"teacher": "t"}, "exactly one of cache"),
    ({"stage": "sft"}, "does not distil"),
    ({"loss": {"divergence": "kl"}}, "loss.divergence"),
    ({"loss": {"relation_features": "pixels"}}, "relation_features"),
    ({"loss": {"alpha_res": -1}}, "loss.alpha_res"),
    ({"loss": {"kd_temperature": 0}}, "loss.kd_temperature"),
    ({"loss": {"jsd_beta": 2}}, "loss.jsd_beta"),
    ({"loss": {"skl_alpha": 1}}, "loss.skl_alpha"),
    ({"loss": {"chunk_size": 0}}, "loss.chunk_size"),
    ({"on_nan": "ignore"}, "on_nan"),
    ({"batch_size": 0}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"template": "vicuna"}, "template"),
    ({"on_too_long": "cut"}, "on_too_long"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"max_steps": 0}, "max_steps"),
    ({"epochs": 0}, "epochs"),
    ({"lr": 0}, "lr"),
    ({"log_every": 0}, "log_every"),
    ({"save_every": -1}, "save_every"),
    ({"num_workers": -1}, "num_workers"),
    ({"block_size": 0}, "block_size"),
    ({"warmup_ratio": -0.1}, "warmup_ratio"),
])
def test_validate_names_the_bad_value(bad, named):
    cfg = train_cfg(**bad)
    with pytest.raises(ConfigError, match=named):
        validate(cfg)


@pytest.mark.parametrize("bad, named", [
    ({"hidden": "fp8"}, "hidden"),
    ({"logprob_dtype": "bf16"}, "logprob_dtype"),
    ({"top_k": 0}, "top_k"),
    ({"on_too_long": "cut"}, "on_too_long: 'cut' is not one of skip, error, truncate"),
    ({"max_length": 1}, "max_length"),
])
def test_dump_config_validation(bad, named):
    with pytest.raises(ConfigError, match=named):
        validate(DumpConfig(teacher="t", data="d", images="i", out="o", **bad))


def test_every_field_has_a_type_and_no_mutable_default():
    for cls in (TrainConfig, LossConfig, DumpConfig, EvalConfig):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        for f in dataclasses.fields(cls):
            assert not isinstance(f.default, (list, dict, set)), (cls.__name__, f.name)


def test_cli_train_flags_hold_no_defaults():
    """The CLI fills TrainConfig from flags; every flag defaults to None so the config's default wins."""
    import inspect

    from kdcache.cli import train

    sig = inspect.signature(train)
    for name, p in sig.parameters.items():
        default = getattr(p.default, "default", p.default)
        assert default in (None, ...), (name, default)


def test_divergences_come_from_the_losses_table_without_torch():
    """config's divergence choices and defaults are kdcache.losses.divergences' (srkl included), and
    reading them imports no torch (the CLI's --help stays fast)."""
    import subprocess
    import sys

    from kdcache import config
    from kdcache.losses.divergences import DIVERGENCES, divergence_params

    assert tuple(config.DIVERGENCES) == tuple(DIVERGENCES) and "srkl" in config.DIVERGENCES
    lc = LossConfig()
    assert (lc.jsd_beta, lc.skl_alpha) == (DIVERGENCES["jsd"]["beta"], DIVERGENCES["skl"]["alpha"])
    for d in DIVERGENCES:
        validate(train_cfg(loss={"divergence": d}))
        assert set(divergence_params(d, beta=0.3, alpha=0.2)) == set(DIVERGENCES[d])
    assert divergence_params("srkl", beta=0.3, alpha=0.2) == {"alpha": 0.2}
    code = "import sys, kdcache.config, kdcache.losses.divergences; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
