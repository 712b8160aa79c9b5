"""Recipes: a whole multi-stage pipeline in one YAML file (``pipelines/*.yaml``).

    kdcache run pipelines/llava_kd.yaml

A recipe names its inputs and lists steps; each step is one of

    make-data: {out, ...make_synthetic args}       skipped when out/ already has the data
    init:      {name, preset | llm, tokenizer?}     a fresh model under workdir/NAME
    train:     {name, stage, student, data, cache?, teacher?, ...TrainConfig keys}
    dump:      {name, teacher, data, ...DumpConfig keys}   -> CACHES/NAME.zarr
               (backend: vllm + vllm: {tensor_parallel_size, ...} for the vLLM teacher backend)
    eval:      {name, model, data, ...}             -> workdir/eval/NAME.json

``student`` / ``teacher`` / ``model`` name an earlier step, an entry of ``models:`` or a path;
``data`` names an entry of ``data:``; ``cache`` names an earlier dump. ``caches:`` says where dumps
go (default ``workdir/caches``; a URL such as ``s3://bucket/runs`` puts them on object storage) and
``storage_options:`` how to reach it (fsspec options for every dump, cached train and eval; put
credentials in the AWS_* variables or a profile, not in the recipe). ``requires:`` lists
recipes to run first (the teacher's, say; each runs once however often it is required).

Before the first step (``requires:`` included) the recipe and every step are checked against
``schemas/recipe.schema.json`` and the typed configs (a wrong key or value is an error naming
it), a dump with ``backend: vllm`` still to run needs vLLM (else the install hint), and every
input a step reads (data files, image folders, models, tokenizers) must exist or be made by an
earlier step: a missing one is an error naming the step and the path, not a failure minutes in.

A step is done only when all its outputs exist *with its settings*: each step writes a stamp,
``WORKDIR/.steps/NAME.json``, holding the hash of its settings and of its inputs (data files by
sha256, a model or cache by the hash of the step that made it). A rerun skips steps whose stamp
matches, resumes a step that started with the same hash (each step resumes itself), and
refuses, naming what changed, to reuse an output made with other settings or inputs (remove it
to redo the step). make-data's stamp is the data directory's own ``synthetic.json``; data made
with other settings is made again (it is synthetic and seeded). Evaluations are simply rerun.

Overrides (``kdcache run --set KEY=VALUE``, ``run_recipe(overrides=...)``): dotted keys into the
recipe, ``defaults.max_steps=2``, ``dump_defaults.top_k=16``, or ``steps.NAME.KEY=VALUE`` for the
step called NAME (``steps.data.num_images=40``); they apply to the ``requires:`` recipes too.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cache.store import CacheLocation
from .config import ConfigError, DumpConfig, EvalConfig, TrainConfig, from_dict, validate
from .positions import parse_kinds

STEP_KINDS = ("make-data", "init", "train", "dump", "eval")
# Keys every step sets itself (a name resolved by ``plan``): a default for them would be ignored.
PER_STEP_TRAIN = ("stage", "student", "data", "images", "out", "cache", "teacher")
PER_STEP_DUMP = ("teacher", "data", "images", "out")


def load_schema(name: str) -> dict:
    from importlib.resources import files

    return json.loads(files("kdcache").joinpath("schemas", name).read_text())


STAMP_DIR = ".steps"  # WORKDIR/.steps/NAME.json: a step's settings hash (see the module docstring)


@dataclass(frozen=True)
class Step:
    kind: str
    name: str
    args: dict
    output: Path | CacheLocation  # a dump's output may be a URL
    where: str = ""  # "steps[i] (kind name)" of its recipe, for messages
    stamp: Path | None = None  # WORKDIR/.steps/NAME.json; None for make-data (its synthetic.json)


def _step_name(entry: dict, i: int) -> str:
    (kind, args), = entry.items()
    return (args or {}).get("name") or f"{kind}{i}"


def _set_path(d: dict, dotted: str, value) -> bool:
    """Set ``dotted`` in the raw recipe ``d``; ``steps.NAME.KEY`` sets KEY of the step called NAME.
    Returns False for a ``steps.NAME`` override when this recipe has no step NAME."""
    keys = dotted.split(".")
    if keys[0] == "steps" and len(keys) >= 3:
        for i, entry in enumerate(d.get("steps") or []):
            if isinstance(entry, dict) and len(entry) == 1 and _step_name(entry, i) == keys[1]:
                (kind, args), = entry.items()
                entry[kind] = args = dict(args or {})
                _set_path(args, ".".join(keys[2:]), value)
                return True
        return False
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value
    return True


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
    from .cache.store import cache_location, merged_options

    models = {k: v for k, v in (recipe.get("models") or {}).items()}
    data = recipe.get("data") or {}
    defaults = recipe.get("defaults") or {}
    dump_defaults = recipe.get("dump_defaults") or {}
    produced: dict[str, Path] = {}
    caches: dict[str, str] = {}
    cache_root = recipe.get("caches") or str(workdir / "caches")
    storage = dict(recipe.get("storage_options") or {})
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
        stamp = workdir / STAMP_DIR / f"{name}.json"
        if kind == "make-data":
            steps.append(Step(kind, name, args, Path(args["out"]), where))
        elif kind == "init":
            out = workdir / name
            steps.append(Step(kind, name, args, out, where, stamp))
            produced[name] = out
        elif kind == "train":
            d = data_ref(args.pop("data"), where)
            cache = args.pop("cache", None)
            teacher = args.pop("teacher", None)
            kw = {**copy.deepcopy(defaults), **args}
            kw.update(student=model_ref(args.pop("student"), where), data=d["json"], images=d["images"],
                      out=str(workdir / name))
            if cache is not None:
                if cache in caches:
                    kw["cache"] = caches[cache]
                elif "://" in cache or "/" in cache or Path(cache).exists():  # a cache path or URL (another recipe's dump)
                    kw["cache"] = cache
                else:
                    raise ConfigError(f"{where}: cache {cache!r} is neither an earlier dump step nor a path")
                kw["storage_options"] = merged_options(storage, kw.get("storage_options"))
            if teacher is not None:
                kw["teacher"] = model_ref(teacher, where)
            if "loss" in defaults and "loss" in args:
                kw["loss"] = {**defaults["loss"], **args["loss"]}
            try:
                cfg = from_dict(TrainConfig, kw)
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            steps.append(Step(kind, name, {"config": cfg}, workdir / name, where, stamp))
            produced[name] = workdir / name
        elif kind == "dump":
            d = data_ref(args.pop("data"), where)
            kw = {**copy.deepcopy(dump_defaults), **args}
            kw.update(teacher=model_ref(args.pop("teacher"), where), data=d["json"], images=d["images"],
                      out=f"{cache_root.rstrip('/')}/{name}.zarr")
            kw["storage_options"] = merged_options(storage, kw.get("storage_options"))
            if "positions" in kw:
                kw["positions"] = parse_kinds(kw["positions"])
            if "vllm" in dump_defaults and "vllm" in args:  # engine settings merge key by key, like loss:
                kw["vllm"] = {**dump_defaults["vllm"], **args["vllm"]}
            try:
                cfg = from_dict(DumpConfig, kw)
                validate(cfg)
                out = cache_location(cfg.out, cfg.storage_options)  # refused before any step runs
            except (ConfigError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None
            steps.append(Step(kind, name, {"config": cfg}, out.local if out.is_local else out, where, stamp))
            caches[name] = cfg.out
        elif kind == "eval":
            d = data_ref(args.pop("data"), where)
            kw = dict(args)
            kw.update(model=model_ref(args.pop("model"), where), data=d["json"], images=d["images"],
                      out=str(workdir / "eval" / f"{name}.json"))
            if "teacher_cache" in kw:
                kw["teacher_cache"] = caches[kw["teacher_cache"]]
                kw["storage_options"] = merged_options(storage, kw.get("storage_options"))
            try:
                cfg = from_dict(EvalConfig, kw)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            steps.append(Step(kind, name, {"config": cfg}, Path(cfg.out), where, stamp))
        else:  # the schema already refuses this; kept for direct callers of plan()
            raise ConfigError(f"{where}: unknown step kind {kind!r}; choose from {', '.join(STEP_KINDS)}")
    return steps


# ---- inputs, outputs and stamps ---------------------------------------------------------------
def synthetic_args(step: Step) -> dict:
    """A make-data step's ``make_synthetic`` arguments with the defaults filled in (what the data
    directory's ``synthetic.json`` records)."""
    from .data.synthetic import make_synthetic

    args = {k: v for k, v in step.args.items() if k != "out"}
    bound = inspect.signature(make_synthetic).bind(step.args["out"], **args)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "out_dir"}


def step_outputs(step: Step) -> list[Path]:
    """What a step makes; the make-data step's files from its arguments (``make_synthetic``)."""
    if step.kind != "make-data":
        return [step.output]
    a, out = synthetic_args(step), step.output
    names = ["images", "tokenizer", "captions.json", "instruct.json", "val.json", "eval.json"]
    if a["student_images"]:
        names += ["captions_small.json", "instruct_small.json"]
    return [out] + [out / n for n in names]


def _looks_local(ref: str) -> bool:
    """A model reference that can only be a local path (not an ``owner/name`` hub id)."""
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1 or Path(ref).parent.is_dir()


def step_inputs(step: Step) -> list[tuple[str, Path]]:
    """(label, path) of every local file or directory a step reads."""
    if step.kind == "make-data":
        return []
    if step.kind == "init":
        a = step.args
        refs = [("tokenizer", a.get("tokenizer"))] + [(k, a.get(k)) for k in ("llm", "vision")
                                                       if a.get(k) and _looks_local(a[k])]
        return [(k, Path(v)) for k, v in refs if v]
    cfg = step.args["config"]
    got = [("data", cfg.data), ("images", cfg.images)]
    for key in ("student", "teacher", "model"):
        ref = getattr(cfg, key, None)
        if ref and _looks_local(ref):
            got.append((key, ref))
    for key in ("cache", "teacher_cache"):
        if getattr(cfg, key, None):
            got.append((key, getattr(cfg, key)))
    return [(k, _as_input(v)) for k, v in got]


def _as_input(ref: str) -> Path | CacheLocation:
    """A step input: a local path, or the location of a cache URL (``caches: s3://...``)."""
    from .cache.store import cache_location

    loc = cache_location(ref)
    return loc.local if loc.is_local else loc


def _exists(p: Path | CacheLocation) -> bool:
    return p.exists() if isinstance(p, Path) else p.exists("zarr.json")


def _key(p: Path | CacheLocation):
    """What identifies an output across steps: a resolved path, or a URL."""
    return p.resolve() if isinstance(p, Path) else p.url


_SHA: dict[tuple, str] = {}


def _file_sha(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        from .dump import file_hash

        _SHA[key] = file_hash(path)
    return _SHA[key]


def _fingerprint(path: Path | CacheLocation, made: dict) -> str:
    """A file: its sha256. A directory or cache URL an earlier step made: that step's hash. Else
    'external'."""
    if isinstance(path, Path) and path.is_file():
        return "sha256:" + _file_sha(path)
    return made.get(_key(path), "external")


def step_record(step: Step, made: dict[Path, str]) -> dict:
    """What a step's stamp records: its kind, settings and inputs' fingerprints, and their hash."""
    from .config import to_dict

    settings = synthetic_args(step) if step.kind == "make-data" else (
        to_dict(step.args["config"]) if "config" in step.args else dict(step.args))
    settings.pop("storage_options", None)  # how to reach a cache, not what the step makes (and may hold secrets)
    inputs = {f"{label}:{path}": _fingerprint(path, made) for label, path in step_inputs(step)}
    doc = {"kind": step.kind, "settings": settings, "inputs": inputs}
    doc["hash"] = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return doc


def _outputs_complete(step: Step) -> bool:
    if step.kind == "make-data":
        return all(p.exists() for p in step_outputs(step))
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


def read_stamp(step: Step) -> dict | None:
    if step.kind == "make-data":
        from .data.synthetic import read_manifest

        m = read_manifest(step.output)
        return None if m is None else {"state": "done", "settings": m["args"]}
    try:
        return json.loads(step.stamp.read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_stamp(step: Step, record: dict, state: str) -> None:
    if step.kind == "make-data":  # make_synthetic writes synthetic.json itself
        return
    step.stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = step.stamp.with_name(step.stamp.name + ".partial")
    tmp.write_text(json.dumps({**record, "state": state}, indent=2, default=str) + "\n")
    tmp.replace(step.stamp)


def is_done(step: Step, record: dict | None = None) -> bool:
    """All outputs exist and the stamp says the step finished (with ``record``'s hash, if given)."""
    stamp = read_stamp(step)
    if stamp is None or stamp.get("state") != "done" or not _outputs_complete(step):
        return False
    if record is None:
        return True
    if step.kind == "make-data":
        return stamp["settings"] == record["settings"]
    return stamp.get("hash") == record["hash"]


def _changes(old: dict, new: dict) -> str:
    """'settings.lr, inputs.data:...' : the keys whose values differ between two stamp records."""
    diff = []
    for part in ("settings", "inputs"):
        a, b = old.get(part) or {}, new.get(part) or {}
        diff += [f"{part}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "") or "unknown (no stamp)"


def refuse_stale(step: Step, record: dict) -> None:
    """A step's output that exists but was made with other settings or inputs (or by hand: no
    stamp) is never taken as done nor silently resumed: refuse, naming what changed."""
    if step.kind in ("make-data", "eval") or not _exists(step.output):
        return
    stamp = read_stamp(step)
    if stamp is not None and stamp.get("hash") == record["hash"]:
        return  # done, or started with these settings: the step resumes itself
    why = ("no stamp: it was not made by this step" if stamp is None
           else f"made with other settings or inputs: {_changes(stamp, record)}")
    raise ConfigError(f"{step.where}: {step.output} exists but was {why}. Remove it to redo the step "
                      f"(rm -r {step.output}), or run the recipe with another --workdir")


def preflight(chain: list[tuple[Path, list[Step]]]) -> None:
    """Before any step runs: every input of every step exists or is made by an earlier step, and
    no step's existing output lacks a stamp. All problems are reported at once."""
    made: set[Path] = set()
    problems = []
    for rpath, steps in chain:
        for s in steps:
            for label, path in step_inputs(s):
                if not _exists(path) and _key(path) not in made:
                    problems.append(f"[{rpath.stem}] {s.where} needs {label} {path}, which does not exist and no "
                                    "earlier step makes")
            if s.kind not in ("make-data", "eval") and _exists(s.output) and read_stamp(s) is None:
                problems.append(f"[{rpath.stem}] {s.where}: {s.output} exists but has no stamp (not made by this "
                                f"step): remove it (rm -r {s.output}) or use another --workdir")
            made |= {_key(p) for p in step_outputs(s)}
    if problems:
        raise ConfigError(f"the recipe cannot run ({len(problems)} problem(s), nothing was run): "
                          + "; ".join(problems))


def run_step(step: Step) -> None:
    if step.kind == "make-data":
        from .data.synthetic import make_synthetic

        make_synthetic(step.args["out"], **{k: v for k, v in step.args.items() if k != "out"})
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


def _chain(path: Path, workdir: Path | None, overrides: dict | None, seen: set[Path],
           matched: set[str]) -> list[tuple[Path, list[Step]]]:
    """[(recipe, planned steps)], every ``requires:`` recipe first and once."""
    recipe = load_recipe(path, overrides)
    names = {_step_name(e, i) for i, e in enumerate(recipe["steps"])}
    matched |= {k for k in (overrides or {}) if k.startswith("steps.") and k.split(".")[1] in names}
    wd = Path(workdir) if workdir is not None else Path(recipe["workdir"])
    steps = plan(recipe, wd)
    chain = []
    for req in recipe.get("requires") or []:
        rp = Path(path).parent / req if not Path(req).is_absolute() else Path(req)
        if rp.resolve() not in seen:
            chain += _chain(rp, None, _inherited(overrides), seen, matched)
    seen.add(Path(path).resolve())
    return chain + [(Path(path), steps)]


def run_recipe(path: str | Path, *, workdir: str | Path | None = None, dry_run: bool = False,
               overrides: dict | None = None) -> list[Step]:
    """Run every step of a recipe (and of its ``requires:`` first) that is not done yet; returns
    the recipe's own steps. Everything is planned and checked before the first step runs."""
    matched: set[str] = set()
    chain = _chain(Path(path), workdir, overrides, set(), matched)
    unmatched = sorted(k for k in (overrides or {}) if k.startswith("steps.") and k not in matched)
    if unmatched:
        raise ConfigError(f"override(s) {', '.join(unmatched)}: no step of this recipe or its requires: has that "
                          "name (steps.NAME.KEY; a step's name is its name: key, else KIND + its index)")
    if not dry_run:
        check_backends([s for _r, steps in chain for s in steps])
        preflight(chain)
    made: dict[Path, str] = {}
    for rpath, steps in chain:
        for s in steps:
            record = step_record(s, made)
            for out in step_outputs(s):
                made[_key(out)] = record["hash"]
            done = is_done(s, record)
            print(f"[{rpath.stem}] {s.kind:<9} {s.name:<24} {'done' if done else 'run'} -> {s.output}", flush=True)
            if dry_run or done:
                continue
            refuse_stale(s, record)
            if s.kind == "make-data" and read_stamp(s) is not None:
                print(f"[{rpath.stem}] {s.output} holds synthetic data made with other settings "
                      f"({_changes(read_stamp(s), record)}): making it again", flush=True)
            write_stamp(s, record, "started")
            run_step(s)
            write_stamp(s, record, "done")
    return chain[-1][1]


def _inherited(overrides: dict | None) -> dict:
    """Overrides that make sense for a required recipe too (sizes and named steps, not names)."""
    return {k: v for k, v in (overrides or {}).items() if k.startswith(("defaults.", "dump_defaults.", "steps."))}
