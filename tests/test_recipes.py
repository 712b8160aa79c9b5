"""Every recipe in pipelines/ runs end to end at toy size; wrong recipes fail naming the key.

All recipe tests share one working directory (session scope) holding a tiny ``data/`` made
beforehand, so each recipe's make-data step is skipped as done and the teacher (and assistant)
recipes, which the others ``require:``, run once: the first test that needs them runs them and
the rest find them done. Every train step is shrunk to 2 steps of batch 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdcache.config import ConfigError
from kdcache.recipes import is_done, load_recipe, plan, run_recipe

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
RECIPES = sorted(PIPELINES.glob("*.yaml"))
SMALL = {"defaults.max_steps": 2, "defaults.batch_size": 4, "defaults.num_workers": 0,
         # the teacher's and assistant's make-data step, at the size of recipe_root's data/
         "steps.data.num_images": 12, "steps.data.qa_per_image": 1, "steps.data.num_val": 2,
         "steps.data.num_eval": 4, "steps.data.student_images": 8}
# Teacher and assistant first: the others require them.
ORDER = sorted(RECIPES, key=lambda p: (p.stem not in ("teacher_pt_sft", "assistant_pt_sft"), p.stem))


@pytest.fixture(scope="session")
def recipe_root(tmp_path_factory) -> Path:
    """A working directory with a tiny ``data/`` (12 images, 8 for the students, 4 eval)."""
    from kdcache.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("recipes")
    make_synthetic(root / "data", num_images=12, qa_per_image=1, num_val=2, num_eval=4, student_images=8, seed=0)
    return root


def test_there_is_a_recipe_for_every_scheme():
    names = {p.stem for p in RECIPES}
    assert {"teacher_pt_sft", "student_pt_sft", "llava_kd", "ablation_pt_dft", "ablation_dpt_dft",
            "ablation_pt_sft_dft", "ablation_dpt_dft_dft", "ablation_no_res", "ablation_no_vis",
            "ablation_no_rel", "ablation_response_only", "llava_ckd_bottom_up", "llava_ckd_top_down",
            "assistant_pt_sft"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_starts_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# kdcache run pipelines/{path.name}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans_without_running(path, tmp_path):
    steps = plan(load_recipe(path), tmp_path)
    assert steps and all(s.kind in ("make-data", "init", "train", "dump", "eval") for s in steps)
    assert not any(is_done(s) for s in steps if s.kind != "make-data")


def _logged_terms(cfg) -> set[str]:
    lc = cfg.loss
    terms = {"reg", "total"}
    if cfg.distills:
        terms |= {t for t, w in (("res", lc.alpha_res), ("vis", lc.beta_vis), ("rel", lc.gamma_rel),
                                  ("prompt", lc.prompt_weight)) if w}
    return {f"loss/{t}" for t in terms}


@pytest.mark.parametrize("path", ORDER, ids=lambda p: p.stem)
def test_recipe_runs_end_to_end_at_toy_size(path, recipe_root, monkeypatch):
    monkeypatch.chdir(recipe_root)
    steps = run_recipe(path, overrides=SMALL)
    assert all(is_done(s) for s in steps)
    for s in steps:
        if s.kind == "train":
            cfg = s.args["config"]
            metrics = [json.loads(x) for x in (s.output / "metrics.jsonl").read_text().splitlines()]
            assert metrics[-1]["step"] == 2, s.name
            assert {k for k in metrics[-1] if k.startswith("loss/")} == _logged_terms(cfg), s.name
            assert (s.output / "model.safetensors").is_file()
            if cfg.stage in ("dpt", "dft"):
                assert cfg.cache is not None and cfg.teacher is None  # recipes distil offline
        if s.kind == "eval":
            report = json.loads(s.output.read_text())
            assert report["num_samples"] == 4


def test_rerun_skips_what_is_done(recipe_root, monkeypatch, capsys):
    monkeypatch.chdir(recipe_root)
    path = PIPELINES / "llava_kd.yaml"
    steps = run_recipe(path, overrides=SMALL)  # done by the end-to-end test already, or now
    stamps = {s.name: (s.output / "DONE").stat().st_mtime_ns for s in steps if s.kind == "train"}
    capsys.readouterr()
    run_recipe(path, overrides=SMALL)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert lines and all(" done -> " in x for x in lines)
    assert stamps == {s.name: (s.output / "DONE").stat().st_mtime_ns for s in steps if s.kind == "train"}


# ---------------------------------------------------------------------------------------------
# Wrong recipes are errors naming the key, before anything runs


def _write(tmp_path, recipe: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def _base() -> dict:
    return yaml.safe_load((PIPELINES / "llava_kd.yaml").read_text())


@pytest.mark.parametrize("override, named", [
    ({"defaults.batch_sise": 4}, "batch_sise"),
    ({"defaults.batch_size": "four"}, "batch_size"),
    ({"defaults.loss.divergence": "kl"}, "loss.divergence"),
    ({"defaults.loss.alpha": 1.0}, "loss.alpha"),
    ({"defaults.stage": "xx"}, "stage"),
    ({"defaults.lr": -1.0}, "lr"),
    ({"dump_defaults.top_k": 0}, "top_k"),
    ({"dump_defaults.positions": ["visual", "answer"]}, "answer"),
    ({"dump_defaults.hidden": "fp8"}, "hidden"),
    ({"workdir": "/abs"}, "workdir"),
    ({"stepz": []}, "stepz"),
])
def test_wrong_key_or_value_is_an_error_naming_it(override, named, tmp_path):
    with pytest.raises(ConfigError, match=named):
        plan(load_recipe(PIPELINES / "llava_kd.yaml", override), tmp_path)


def test_wrong_steps_are_errors_naming_the_step(tmp_path):
    r = _base()
    r["steps"][3] = {"trian": {"name": "dpt", "stage": "dpt"}}
    with pytest.raises(ConfigError, match=r"steps\.3"):
        load_recipe(_write(tmp_path, r))
    r = _base()
    r["steps"][5]["train"]["student"] = "nope"
    with pytest.raises(ConfigError, match=r"steps\[5\] \(train dft\).*'nope'"):
        plan(load_recipe(_write(tmp_path, r)), tmp_path)
    r = _base()
    r["steps"][5]["train"]["cache"] = "teacher_nope"
    with pytest.raises(ConfigError, match="cache 'teacher_nope' is neither an earlier dump step nor a path"):
        plan(load_recipe(_write(tmp_path, r)), tmp_path)
    r = _base()
    r["steps"][4]["train"]["data"] = "instructions"
    with pytest.raises(ConfigError, match="data 'instructions' is not in data"):
        plan(load_recipe(_write(tmp_path, r)), tmp_path)
    r = _base()
    r["steps"][4]["train"]["cache"] = "teacher_instruct"  # an sft step does not distil
    with pytest.raises(ConfigError, match=r"steps\[4\] \(train sft\).*does not distil"):
        plan(load_recipe(_write(tmp_path, r)), tmp_path)
    r = _base()
    r["steps"][5]["train"]["name"] = "sft"
    with pytest.raises(ConfigError, match="name 'sft' is used twice"):
        plan(load_recipe(_write(tmp_path, r)), tmp_path)


# ---------------------------------------------------------------------------------------------
# The dump backend is a config field: a recipe chooses vLLM


def _vllm_recipe() -> dict:
    r = _base()
    r["dump_defaults"].update(backend="vllm", vllm={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5})
    r["steps"][2]["dump"]["vllm"] = {"max_num_batched_tokens": 4096}  # merged key by key with the defaults
    return r


def test_recipe_backend_vllm_parses_into_the_config(tmp_path):
    from kdcache.config import DumpConfig, VllmConfig, vllm_gpu_memory_utilization

    dumps = [s for s in plan(load_recipe(_write(tmp_path, _vllm_recipe())), tmp_path) if s.kind == "dump"]
    cfgs = [s.args["config"] for s in dumps]
    assert all(isinstance(c, DumpConfig) and c.backend == "vllm" for c in cfgs)
    assert cfgs[0].vllm == VllmConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5)
    assert cfgs[1].vllm == VllmConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5, max_num_batched_tokens=4096)
    assert vllm_gpu_memory_utilization(cfgs[0]) == 0.5
    # gpu_memory_utilization null: vLLM's own 0.9 alone, 0.6 when the HF teacher computes hidden states
    auto = [DumpConfig(teacher="-", data="-", images="-", out="-", backend="vllm", hidden=h) for h in ("none", "bf16")]
    assert [vllm_gpu_memory_utilization(c) for c in auto] == [0.9, 0.6]
    hf = plan(load_recipe(PIPELINES / "llava_kd.yaml"), tmp_path)
    assert {s.args["config"].backend for s in hf if s.kind == "dump"} == {"hf"}


@pytest.mark.parametrize("override, named", [
    ({"dump_defaults.backend": "tgi"}, "backend"),
    ({"dump_defaults.vllm": {"dtype": "int8"}}, "dtype"),
    ({"dump_defaults.vllm": {"tensor_parallel": 2}}, "tensor_parallel"),
    ({"dump_defaults.vllm": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization"),
])
def test_wrong_vllm_settings_are_errors_naming_them(override, named, tmp_path):
    with pytest.raises(ConfigError, match=named):
        plan(load_recipe(PIPELINES / "llava_kd.yaml", override), tmp_path)


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None,
                    reason="vLLM is installed: the missing-dependency error cannot be tested")
def test_recipe_with_vllm_fails_before_any_work_without_vllm(tmp_path, monkeypatch):
    """``kdcache run`` on a recipe with a vLLM dump: one line with the install hint, exit code 2,
    and nothing made, the required teacher recipe (make-data, training) included."""
    from typer.testing import CliRunner

    from kdcache.backends import BackendUnavailable
    from kdcache.cli import app

    (tmp_path / "teacher_pt_sft.yaml").write_text((PIPELINES / "teacher_pt_sft.yaml").read_text())
    path = _write(tmp_path, _vllm_recipe())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackendUnavailable, match=r"pip install 'kdcache\[vllm\]'"):
        run_recipe(path)
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "kdcache[vllm]" in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "teacher_pt_sft.yaml"]
    assert len(run_recipe(path, dry_run=True)) == 7  # a dry run only prints: it needs no vLLM


# ---------------------------------------------------------------------------------------------
# Pre-flight and stamps: every input checked before the first step; done means done with these settings


def test_missing_inputs_are_reported_before_any_step_runs(tmp_path, monkeypatch):
    r = _base()
    r.pop("requires")  # nothing makes the teacher nor data/*_small.json now
    path = _write(tmp_path, r)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        run_recipe(path)
    msg = str(e.value)
    assert "nothing was run" in msg
    assert "steps[1] (dump teacher_captions) needs teacher runs/teacher/sft" in msg
    assert "needs data data/captions_small.json" in msg and "needs tokenizer data/tokenizer" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing made


def test_data_made_with_other_settings_is_made_again_and_stale_outputs_are_refused(tmp_path, monkeypatch, capsys):
    """The issue's path: `make-data --out data` (no *_small.json, other sizes) then a recipe. The
    make-data step is not done (its settings differ): it runs. Then a rerun with another warm-up finds
    the pt step's output made with other settings and refuses, naming the key, touching nothing."""
    from kdcache.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", num_images=6, qa_per_image=1, num_val=1, num_eval=1, seed=0)
    assert not (tmp_path / "data" / "captions_small.json").exists()
    monkeypatch.chdir(tmp_path)
    teacher = PIPELINES / "teacher_pt_sft.yaml"
    steps = run_recipe(teacher, overrides=SMALL)
    out = capsys.readouterr().out
    assert "holds synthetic data made with other settings" in out and "settings.num_images" in out
    assert (tmp_path / "data" / "captions_small.json").is_file()
    assert len(json.loads((tmp_path / "data" / "captions.json").read_text())) == 12
    assert all(is_done(s) for s in steps) and (tmp_path / "runs/teacher/.steps/pt.json").is_file()
    before = (tmp_path / "runs/teacher/pt/DONE").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"steps\[2\] \(train pt\): runs/teacher/pt exists but was made with "
                                          r"other settings or inputs: settings\.warmup_ratio.*Remove it"):
        run_recipe(teacher, overrides={**SMALL, "defaults.warmup_ratio": 0.1})
    assert (tmp_path / "runs/teacher/pt/DONE").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"override\(s\) steps\.nope\.x: no step"):
        run_recipe(teacher, overrides={**SMALL, "steps.nope.x": 1})
