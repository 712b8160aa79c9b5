"""Recipes: a whole multi-stage pipeline in one YAML file (``pipelines/*.yaml``).

    kdcache run pipelines/llava_kd.yaml

A recipe names its inputs and lists steps; each step is one of

    make-data: {out, ...make_synthetic args}       skipped when out/ already has the data
    init:      {name, preset | llm, tokenizer?}     a fresh model under workdir/NAME
    train:     {name, stage, student, data, cache?, teacher?, ...TrainConfig keys}
    dump:      {name, teacher, data, ...DumpConfig keys}   -> workdir/caches/NAME.zarr
               (backend: vllm + vllm: {tensor_parallel_size, ...} for the vLLM teacher backend)
    eval:      {name, model, data, ...}             -> workdir/eval/NAME.json

``student`` / ``teacher`` / ``model`` name an earlier step, an entry of ``models:`` or a path;
``data`` names an entry of ``data:``; ``cache`` names an earlier dump. ``requires:`` lists
recipes to run first (the teacher's, say). A step whose output is complete is skipped, so a
rerun picks up where a crash stopped (and each step resumes itself). The recipe is checked
against ``schemas/recipe.schema.json`` and every step against its typed config before
anything runs; a wrong key or value is an error naming it. A dump step with ``backend: vllm``
that still has to run needs vLLM: a missing vLLM fails with the install hint before any step
(``requires:`` included) runs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, DumpConfig, EvalConfig, TrainConfig, from_dict, validate
from .positions import parse_kinds

STEP_KINDS = ("make-data", "init", "train", "dump", "eval")
# Keys every step sets itself (a name resolved by ``plan``): a default for them would be ignored.
PER_STEP_TRAIN = ("stage", "student", "data", "images", "out", "cache", "teacher")
PER_STEP_DUMP = ("teacher", "data", "images", "out")


def load_schema(name: str) -> dict:
    from importlib.resources import files

    return json.loads(files("kdcache").joinpath("schemas", name).read_text())


@dataclass(frozen=True)
class Step:
    kind: str
    name: str
    args: dict
    output: Path


def _set_path(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def load_recipe(path: str | Path, overrides: dict | None = None) -> dict:
    """Read and validate a recipe; ``overrides`` maps dotted keys (``defaults.max_steps``) to values."""
    import jsonschema

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    raw = copy.deepcopy(raw or {})
    for k, v in (overrides or {}).items():
        _set_path(raw, k, v)
    try:
        jsonschema.validate(raw, load_schema("recipe.schema.json"))
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: {where}: {e.message}") from None
    return raw


def plan(recipe: dict, workdir: Path) -> list[Step]:
    """Resolve names into paths and typed configs; raises ConfigError before anything runs."""
    from .cache.store import cache_location

    models = {k: v for k, v in (recipe.get("models") or {}).items()}
    data = recipe.get("data") or {}
    defaults = recipe.get("defaults") or {}
    dump_defaults = recipe.get("dump_defaults") or {}
    produced: dict[str, Path] = {}
    caches: dict[str, Path] = {}
    steps: list[Step] = []
    for section, d, own in (("defaults", defaults, PER_STEP_TRAIN), ("dump_defaults", dump_defaults, PER_STEP_DUMP)):
        clash = sorted(set(d) & set(own))
        if clash:
            raise ConfigError(f"{section}: {', '.join(clash)} cannot have a default (each step names its own); "
                              f"move it into the steps")
    # Defaults are checked on their own too: a bad one that every step overrides is still a typo.
    try:
        validate(from_dict(TrainConfig, {**defaults, "stage": "pt", "student": "-", "data": "-", "images": "-",
                                         "out": "-"}))
    except ConfigError as e:
        raise ConfigError(f"defaults: {e}") from None
    try:
        dd = dict(dump_defaults)
        if "positions" in dd:
            dd["positions"] = parse_kinds(dd["positions"])
        validate(from_dict(DumpConfig, {**dd, "teacher": "-", "data": "-", "images": "-", "out": "-"}))
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"dump_defaults: {e}") from None

    def model_ref(ref: str, where: str) -> str:
        if ref in produced:
            return str(produced[ref])
        if ref in models:
            return str(models[ref])
        if Path(ref).exists() or "/" in ref:
            return ref
        raise ConfigError(f"{where}: {ref!r} is not an earlier step, a models: entry or a path")

    def data_ref(ref: str, where: str) -> dict:
        if ref not in data:
            raise ConfigError(f"{where}: data {ref!r} is not in data: ({', '.join(data) or 'empty'})")
        return data[ref]

    for i, entry in enumerate(recipe["steps"]):
        (kind, args), = entry.items()
        args = dict(args or {})
        name = args.pop("name", None) or f"{kind}{i}"
        where = f"steps[{i}] ({kind} {name})"
        if name in produced or name in caches:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        if kind == "make-data":
            steps.append(Step(kind, name, args, Path(args["out"])))
        elif kind == "init":
            out = workdir / name
            steps.append(Step(kind, name, args, out))
            produced[name] = out
        elif kind == "train":
            d = data_ref(args.pop("data"), where)
            cache = args.pop("cache", None)
            teacher = args.pop("teacher", None)
            kw = {**copy.deepcopy(defaults), **args}
            kw.update(student=model_ref(args.pop("student"), where), data=d["json"], images=d["images"],
                      out=str(workdir / name))
            if cache is not None:
                if cache not in caches:
                    raise ConfigError(f"{where}: cache {cache!r} is not an earlier dump step")
                kw["cache"] = str(caches[cache])
            if teacher is not None:
                kw["teacher"] = model_ref(teacher, where)
            if "loss" in defaults and "loss" in args:
                kw["loss"] = {**defaults["loss"], **args["loss"]}
            try:
                cfg = from_dict(TrainConfig, kw)
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            steps.append(Step(kind, name, {"config": cfg}, workdir / name))
            produced[name] = workdir / name
        elif kind == "dump":
            d = data_ref(args.pop("data"), where)
            kw = {**copy.deepcopy(dump_defaults), **args}
            kw.update(teacher=model_ref(args.pop("teacher"), where), data=d["json"], images=d["images"],
                      out=str(workdir / "caches" / f"{name}.zarr"))
            if "positions" in kw:
                kw["positions"] = parse_kinds(kw["positions"])
            if "vllm" in dump_defaults and "vllm" in args:  # engine settings merge key by key, like loss:
                kw["vllm"] = {**dump_defaults["vllm"], **args["vllm"]}
            try:
                cfg = from_dict(DumpConfig, kw)
                validate(cfg)
                cache_location(cfg.out)  # a URL kdcache cannot open is refused before any step runs
            except (ConfigError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None
            steps.append(Step(kind, name, {"config": cfg}, Path(cfg.out)))
            caches[name] = Path(cfg.out)
        elif kind == "eval":
            d = data_ref(args.pop("data"), where)
            kw = dict(args)
            kw.update(model=model_ref(args.pop("model"), where), data=d["json"], images=d["images"],
                      out=str(workdir / "eval" / f"{name}.json"))
            if "teacher_cache" in kw:
                kw["teacher_cache"] = str(caches[kw["teacher_cache"]])
            try:
                cfg = from_dict(EvalConfig, kw)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            steps.append(Step(kind, name, {"config": cfg}, Path(cfg.out)))
        else:  # the schema already refuses this; kept for direct callers of plan()
            raise ConfigError(f"{where}: unknown step kind {kind!r}; choose from {', '.join(STEP_KINDS)}")
    return steps


def is_done(step: Step) -> bool:
    if step.kind == "make-data":
        return (step.output / "tokenizer").is_dir() and (step.output / "instruct.json").is_file()
    if step.kind == "init":
        return (step.output / "config.json").is_file()
    if step.kind == "train":
        return (step.output / "DONE").is_file()
    if step.kind == "dump":
        from .cache.writer import cache_finished

        return cache_finished(step.output)
    if step.kind == "eval":
        return step.output.is_file()
    return False


def run_step(step: Step) -> None:
    if step.kind == "make-data":
        from .data.synthetic import make_synthetic

        make_synthetic(**step.args)
    elif step.kind == "init":
        from .models import init_model

        init_model(step.output, **step.args)
    elif step.kind == "train":
        from .train import train

        train(step.args["config"])
    elif step.kind == "dump":
        from .dump import dump

        dump(step.args["config"])
    elif step.kind == "eval":
        from .evaluate import evaluate, format_report

        print(format_report(evaluate(step.args["config"])))


def check_backends(steps: list[Step]) -> None:
    """Raise ``BackendUnavailable`` (with the install hint) if a dump step still to run needs a
    backend that is not installed (vLLM); a finished cache needs nothing."""
    if any(s.kind == "dump" and s.args["config"].backend == "vllm" and not is_done(s) for s in steps):
        from .backends.vllm import import_vllm

        import_vllm()


def run_recipe(path: str | Path, *, workdir: str | Path | None = None, dry_run: bool = False,
               overrides: dict | None = None) -> list[Step]:
    """Run every step of a recipe (and its ``requires:`` first) that is not done yet."""
    recipe = load_recipe(path, overrides)
    wd = Path(workdir) if workdir is not None else Path(recipe["workdir"])
    # Planned (and its backends checked) before the required recipes run: a wrong key or a missing
    # vLLM is reported before any work.
    steps = plan(recipe, wd)
    if not dry_run:
        check_backends(steps)
    for req in recipe.get("requires") or []:
        run_recipe(Path(path).parent / req if not Path(req).is_absolute() else req,
                   workdir=None, dry_run=dry_run, overrides=_inherited(overrides))
    for s in steps:
        done = is_done(s)
        print(f"[{Path(path).stem}] {s.kind:<9} {s.name:<24} {'done' if done else 'run'} -> {s.output}")
        if not dry_run and not done:
            run_step(s)
    return steps


def _inherited(overrides: dict | None) -> dict:
    """Overrides that make sense for a required recipe too (sizes, not names)."""
    return {k: v for k, v in (overrides or {}).items() if k.startswith(("defaults.", "dump_defaults."))}
