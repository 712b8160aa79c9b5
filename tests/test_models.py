"""kdcache.models: aliases, presets, save/load round trips, plain-transformers directories."""

from __future__ import annotations

import json
import time

import pytest
import torch

from kdcache import models
from kdcache.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return make_synthetic(d, num_images=8, qa_per_image=2, num_val=2, num_eval=2, seed=0)["tokenizer"]


def test_aliases_resolve_to_llm_plus_siglip():
    for alias, llm in models.ALIASES.items():
        src = models.resolve(alias)
        assert src.kind == "alias" and src.llm_id == llm and src.vision_id == "google/siglip-so400m-patch14-384"
    assert models.resolve("Qwen2.5-3B").llm_id == "Qwen/Qwen2.5-3B"  # case-insensitive
    assert models.resolve("llava-hf/llava-interleave-qwen-0.5b-hf").kind == "hub"
    with pytest.raises(models.ModelLoadError, match="neither an existing directory"):
        models.resolve("./does/not/exist")


def test_alias_is_not_a_loadable_model():
    with pytest.raises(models.ModelLoadError, match="kdcache init-model --llm qwen2.5-3b"):
        models.model_dir("qwen2.5-3b")


def test_hub_id_without_network_fails_fast_with_local_path_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub  # noqa: F401  (imports are not what is timed)
    import transformers  # noqa: F401

    t0 = time.perf_counter()
    with pytest.raises(models.ModelLoadError, match="pass the directory instead, e.g. --student /path/to/DIR"):
        models.load_model("someone/not-a-real-model", flag="--student")  # the hint names the caller's flag
    assert time.perf_counter() - t0 < 10  # transformers' own retries take ~26 s


def test_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """'runs/s-ptt' where runs/ exists (holding s-pt) is a typo of a local path, not the hub repo."""
    (tmp_path / "runs" / "s-pt").mkdir(parents=True)
    (tmp_path / "runs" / "s-pt" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(models.ModelLoadError, match=r"no model directory runs/s-ptt: runs/ exists here.*"
                                                    r"did you mean runs/s-pt\?") as e:
        models.model_dir("runs/s-ptt")
    assert "huggingface-cli" not in str(e.value)
    assert models.resolve("someone/model").kind == "hub"  # no local someone/: still a hub id


def test_tiny_preset_round_trip(tok_dir, tmp_path):
    out = models.init_model(tmp_path / "t", preset="tiny-student", tokenizer=tok_dir, seed=3)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    model, proc = models.load_model(str(out))
    cfg = model.config
    assert cfg.vision_feature_select_strategy == "full" and cfg.vision_feature_layer == -2
    assert cfg.projector_hidden_act == "gelu"
    assert models.num_image_tokens(cfg, proc) == 16
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == models.image_token_id(cfg)
    assert proc.tokenizer.chat_template
    assert models.projector_trained(out) is False  # fresh projector: the dump refuses it
    # a second load gives the same weights; the shared tiny vision tower is seed-independent
    other = models.init_model(tmp_path / "t2", preset="tiny-teacher", tokenizer=tok_dir, seed=4)
    m2, _ = models.load_model(str(other))
    for (n1, p1), (n2, p2) in zip(model.model.vision_tower.named_parameters(),
                                  m2.model.vision_tower.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert m2.config.text_config.hidden_size == 192


def test_tiny_presets_start_at_their_width_scale(tok_dir, tmp_path):
    # std 1/sqrt(hidden), not Qwen2's 0.02: at 0.02 a tiny LLM never learns to read colour (issue 20)
    for preset, width in (("tiny-student", 64), ("tiny-teacher", 192)):
        model, _ = models.load_model(str(models.init_model(tmp_path / preset, preset=preset, tokenizer=tok_dir)))
        assert model.config.text_config.initializer_range == pytest.approx(width ** -0.5)
        for w in (model.model.language_model.layers[0].mlp.up_proj.weight, model.lm_head.weight,
                  model.model.multi_modal_projector.linear_1.weight):
            assert w.std().item() == pytest.approx(width ** -0.5, rel=0.1)


def test_forward_on_a_batch(tok_dir, tmp_path):
    out = models.init_model(tmp_path / "t", preset="tiny-student", tokenizer=tok_dir)
    model, proc = models.load_model(str(out))
    n = models.num_image_tokens(model.config, proc)
    ids = torch.tensor([[1, 2] + [models.image_token_id(model.config)] * n + [5, 6]])
    logits = model(input_ids=ids, pixel_values=torch.zeros(1, 3, 64, 64)).logits
    assert logits.shape == (1, n + 4, model.config.text_config.vocab_size)


def test_plain_transformers_directory_loads(tok_dir, tmp_path):
    """A directory built with transformers' own classes in the llava-hf layout, not by kdcache."""
    from transformers import (AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              Qwen2Config, SiglipImageProcessor, SiglipVisionConfig)

    tok = AutoTokenizer.from_pretrained(tok_dir)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8)
    tc = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    # llava-hf checkpoints say "default"; honour it (16 patches - 1 = 15 visual tokens)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    d = tmp_path / "plain"
    LlavaForConditionalGeneration(cfg).save_pretrained(d)
    LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                   patch_size=8, vision_feature_select_strategy="default",
                   chat_template=tok.chat_template).save_pretrained(d)
    model, proc = models.load_model(str(d))
    assert models.num_image_tokens(model.config, proc) == 15
    assert models.projector_trained(d) is True  # not kdcache-made: nothing says otherwise
    assert json.loads((d / "config.json").read_text())["model_type"] == "llava"


def test_unknown_preset_and_missing_tokenizer(tmp_path):
    with pytest.raises(models.ModelLoadError, match="unknown preset"):
        models.init_model(tmp_path / "x", preset="huge")
    with pytest.raises(models.ModelLoadError, match="needs --tokenizer"):
        models.init_model(tmp_path / "x", preset="tiny-teacher")


def test_fingerprints_are_stable_and_sensitive(tok_dir, tmp_path):
    a = models.init_model(tmp_path / "a", preset="tiny-student", tokenizer=tok_dir)
    b = models.init_model(tmp_path / "b", preset="tiny-teacher", tokenizer=tok_dir)
    ma, pa = models.load_model(str(a))
    mb, _ = models.load_model(str(b))
    assert models.config_hash(ma.config) == models.config_hash(models.load_model(str(a))[0].config)
    assert models.config_hash(ma.config) != models.config_hash(mb.config)
    assert len(models.tokenizer_hash(pa.tokenizer)) == 16


def test_small_models_load_and_save_without_transformers_bars_or_the_pil_warning(tok_dir, tmp_path, capfd):
    """An 8 MB model loads in milliseconds: no per-tensor bars, no torchvision-fallback warning;
    the bars setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    out = models.init_model(tmp_path / "s", preset="tiny-student", tokenizer=tok_dir, seed=0)
    models.load_model(str(out))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert "requires torchvision" not in err, err
    assert hf_logging.is_progress_bar_enabled()
    assert models.model_bytes(models.load_model(str(out))[0]) < models.QUIET_BARS_BELOW_BYTES
