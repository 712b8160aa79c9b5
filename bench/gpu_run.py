"""Every benchmark table of bench/README.md in one run, each table under its own time budget.

    bash bench/gpu.sh OUT                            # what to run (it sets up, then calls this)
    python bench/gpu_run.py OUT [--profile fast|full] [--only t1,t2] [--deadline-s S]
                                [--device cuda|cpu] [--shapes auto|reduced|real|real-thin]

Each table runs as its own process (``bench/<script>.py --json ... --deadline-at ...``), one
after the other, so a table's rows are measured side by side in one process and every table
starts on an empty GPU. A table gets at most its budget and never the time the tables after it
need at least; it skips the rows that would not fit (and says so), and a table still running
at its budget's end is stopped (SIGTERM, then SIGKILL to its process group) with the rows it
finished kept. After every table OUT is rewritten:

    OUT/tables.md   every table (markdown), each with its status, the GPU named, versions
    OUT/raw.json    every raw number: the tables' reports, timings, environment
    OUT/log.txt     the combined output of every table

and the last thing printed is a compact summary of every table and of each target, met or missed.

Profiles:
    fast   (default) every table at the real shapes in about 6.5 minutes on one H200, model
           building included: fewer steps and samples, one warm-up, the compile row only if
           time is left (``--deadline-s``, default 400)
    full   the scripts' own step and sample counts (~20-25 min on an H100; default deadline 1800 s)

``--device cpu`` runs the same tables at reduced shapes (``--shapes real-thin``: the real widths,
vocabulary and image size with one layer per model, a CPU check of the real-shape code paths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TABLES = ("shapes", "fused_head", "train_step", "train_gc", "loader", "dump")
EXIT_GRACE_S = 5.0  # past a table's deadline before it is stopped: its last row's end, writing, exiting
KILL_GRACE_S = 8.0  # from SIGTERM to SIGKILL


@dataclass
class Table:
    name: str
    args: list[str]
    share: float  # of the run's deadline: at most this long (the last table: whatever is left)
    what: str = ""

    def budget(self, deadline_s: float) -> float:
        return self.share * deadline_s

    def min_s(self, deadline_s: float) -> float:  # kept free for it by the tables before it
        return 0.4 * self.share * deadline_s


def plan(profile: str, device: str, shapes: str, scratch: Path) -> list[Table]:
    """The tables, their command lines and shares of the deadline for a profile, device and
    shape set. The fast profile's shares at its 400 s deadline: shapes 24 s, fused_head 44 s,
    train_step 100 s, train_gc 60 s, loader 60 s, and the dump what is left (>= 110 s)."""
    fast = profile == "fast"
    real = shapes == "real"
    thin = shapes == "real-thin"
    dev = ["--device", device]
    sh = ["--shapes", shapes]
    dump_model = (["--preset", "random:qwen2.5-3b"] if real else
                  ["--preset", "random:qwen2.5-3b", "--layers", "1"] if thin else ["--preset", "tiny-teacher"])
    if real:
        dump_sizes = ["--batch-size", "16", "--num-samples", "128" if fast else "256"]
    elif thin:
        dump_sizes = ["--batch-size", "2", "--num-samples", "4"]
    else:
        dump_sizes = ["--batch-size", "4", "--num-samples", "16"]
    loader_samples = {"real": "192" if fast else "512", "real-thin": "32", "reduced": "192" if fast else "768"}[shapes]
    steps = ["--warmup", "1", "--steps", "8" if real else "5"] if fast else []
    gc_steps = ["--warmup", "1", "--steps", "4" if real else "3"] if fast else []
    gc_batch = ["--batch-size", "8"] if real else []
    return [
        Table("shapes", ["shapes.py"], 0.06, "the real-shape models on the meta device"),
        Table("fused_head", ["fused_head.py", *dev, *sh] + (["--repeats", "5"] if fast else []), 0.11,
              "LM head + CE + top-k divergence: plain vs fused, equality"),
        Table("train_step", ["train_step.py", *dev, *sh, *steps], 0.25,
              "one DFT optimizer step: SFT vs cached KD vs exact vs online vs naive"),
        Table("train_gc", ["train_step.py", *dev, *sh, "--skip-online", "--gradient-checkpointing", *gc_batch]
              + gc_steps, 0.15, "the DFT step with gradient checkpointing, against a 24 GiB card"),
        Table("loader", ["loader.py", "--shapes", shapes, "--samples", loader_samples, "--device", device,
                         "--pace-from", str(scratch / "train_step.json"), "--pace-steps", "24" if real else "8"]
              + (["--workers", "0,4", "--no-per-record"] if fast else []), 0.15,
              "the cache reader: samples/s and the data wait at the measured step"),
        Table("dump", ["dump.py", *dev, *dump_model, *dump_sizes, "--compare-naive", "--compile",
                       "--compile-min-s", "60" if fast and real else "0"], 0.28,
              "the teacher dump: kdcache vs naive (+ compiled), GPU busy, MFU"),
    ]


# ---- environment -----------------------------------------------------------------------------
def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for pkg in ("torch", "transformers", "accelerate", "numpy", "zarr", "numcodecs", "pyarrow", "jsonschema",
                "tokenizers", "safetensors"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "missing"
    if device == "cuda" and shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["gpu"] = q.stdout.strip() or q.stderr.strip()
    else:
        env["gpu"] = "none (CPU run)"
    return env


def env_line(env: dict) -> str:
    return (f"GPU {env['gpu']}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"accelerate {env['accelerate']}, numpy {env['numpy']}, zarr {env['zarr']}, numcodecs {env['numcodecs']}, "
            f"{env['cpus']} CPUs")


# ---- one table -------------------------------------------------------------------------------
class Stopped(Exception):
    """This run got SIGTERM: stop the table running, write OUT with what there is."""


def _on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the table's process group (its script unwinds, removing temporary caches),
    then SIGKILL after KILL_GRACE_S; DataLoader and compile workers are in the same group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_table(t: Table, budget: float, scratch: Path, log, env_vars: dict) -> dict:
    """Run one table's script under ``budget`` seconds; -> its report with the run's status."""
    report = scratch / f"{t.name}.json"
    start = time.time()
    cmd = [sys.executable, str(BENCH / t.args[0]), *t.args[1:], "--json", str(report),
           "--deadline-at", f"{start + budget:.3f}"]
    header = f"\n==== {t.name}: {' '.join(cmd[1:])}  (budget {budget:.0f} s)\n"
    log.write(header)
    log.flush()
    print(header.strip(), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, env=env_vars)
    tail: list[str] = []

    def pump():
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(f"[{t.name}] {line}")
            sys.stdout.flush()
            tail.append(line.rstrip())
            del tail[:-20]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=budget + EXIT_GRACE_S)  # the script stops itself at its deadline
    except subprocess.TimeoutExpired:
        killed = True
        stop_group(proc)
    except BaseException:  # this run stopped (SIGTERM, Ctrl-C): the table's processes too
        stop_group(proc)
        raise
    reader.join(timeout=5)
    wall = time.time() - start
    try:
        rep = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        rep = {"table": t.name, "rows": [], "markdown": "", "summary": [], "skipped": {}, "notes": []}
    last = next((line for line in reversed(tail) if line.strip()), "")
    if killed:
        rep["status"] = (f"killed at its budget ({budget:.0f} s) with {len(rep.get('rows', []))} rows done, "
                         f"while measuring: {rep.get('current') or 'between rows'}")
    elif proc.returncode != 0:
        rep["status"] = f"failed (exit {proc.returncode}) with {len(rep.get('rows', []))} rows done: {last[:300]}"
    elif rep.get("status") in (None, "running"):
        rep["status"] = "ended without finishing its report"
    rep["wall_s"] = wall
    rep["budget_s"] = budget
    rep["command"] = " ".join(cmd[1:])
    rep["what"] = t.what
    print(f"==== {t.name}: {rep['status']} in {wall:.0f} s", flush=True)
    return rep


# ---- output ----------------------------------------------------------------------------------
def write_out(out: Path, meta: dict, reports: dict, order: list[str]) -> str:
    """Rewrite OUT/raw.json and OUT/tables.md; return the compact summary."""
    (out / "raw.json").write_text(json.dumps({"run": meta, "tables": reports}, indent=1, default=str))
    parts = [f"# kdcache benchmark tables ({meta['profile']} profile, {meta['shapes']} shapes)", "",
             env_line(meta["env"]), "",
             f"Started {meta['started']}, deadline {meta['deadline_s']:.0f} s, elapsed {meta['elapsed_s']:.0f} s."
             f" Each table is one process; ratios are within a table.", ""]
    summary = [f"== {env_line(meta['env'])}; profile {meta['profile']}, {meta['shapes']} shapes, "
               f"{meta['elapsed_s']:.0f} s of {meta['deadline_s']:.0f}"]
    targets = []
    for name in order:
        r = reports.get(name)
        if r is None:
            parts += [f"## {name}", "", "not run yet", ""]
            summary.append(f"-- {name}: not run yet")
            continue
        status = r.get("status", "?")
        parts += [f"## {name}: {r.get('what', '')}", "",
                  f"status: {status}; {r.get('wall_s', 0):.0f} s of a {r.get('budget_s', 0):.0f} s budget", "",
                  f"`{r.get('command', '')}`", "", r.get("markdown") or "(no rows)", ""]
        if r.get("summary"):
            parts += ["Targets and ratios:", ""] + [f"- {s}" for s in r["summary"]] + [""]
        if r.get("notes"):
            parts += ["Notes:", ""] + [f"- {s}" for s in r["notes"]] + [""]
        summary += [f"-- {name}: {status} ({r.get('wall_s', 0):.0f} s)", r.get("markdown") or "(no rows)"]
        targets += r.get("summary", [])
    (out / "tables.md").write_text("\n".join(parts) + "\n")
    return "\n".join(summary + ["", "== targets"] + [f"  {s}" for s in targets])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="output folder: tables.md, raw.json, log.txt")
    ap.add_argument("--profile", default="fast", choices=["fast", "full"])
    ap.add_argument("--only", default=None, help=f"comma-separated tables from {', '.join(TABLES)}")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop everything after this many seconds (default: fast 400, full 1800)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="auto", choices=["auto", "reduced", "real", "real-thin"],
                    help="auto: real on cuda, reduced on cpu")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline_s = args.deadline_s or (400.0 if args.profile == "fast" else 1800.0)
    shapes = args.shapes if args.shapes != "auto" else ("real" if args.device == "cuda" else "reduced")
    only = TABLES if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [x for x in only if x not in TABLES]
    if unknown:
        raise SystemExit(f"--only: unknown table(s) {', '.join(unknown)}; choose from {', '.join(TABLES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="kdcache-gpu-run-"))
    tables = [t for t in plan(args.profile, args.device, shapes, scratch) if t.name in only]
    env_vars = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
                        os.pathsep) if p]))
    meta = {"profile": args.profile, "shapes": shapes, "device": args.device, "deadline_s": deadline_s,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": environment(args.device),
            "tables": [t.name for t in tables], "elapsed_s": 0.0}
    print(f"== kdcache gpu run: {env_line(meta['env'])}; profile {args.profile}, {shapes} shapes, tables "
          f"{', '.join(t.name for t in tables)}, deadline {deadline_s:.0f} s", flush=True)
    reports: dict[str, dict] = {}
    order = [t.name for t in tables]
    signal.signal(signal.SIGTERM, _on_sigterm)
    stopped = None
    with open(args.out / "log.txt", "a") as log:
        log.write(f"== kdcache gpu run {meta['started']}: {json.dumps(meta)}\n")
        try:
            run_all(tables, deadline_s, t0, scratch, log, env_vars, reports, meta, args.out, order)
        except (Stopped, KeyboardInterrupt) as e:
            stopped = str(e) or "interrupted"
            for t in tables:
                if t.name not in reports:  # the table running (its rows so far) and those after it
                    try:
                        partial = json.loads((scratch / f"{t.name}.json").read_text())
                    except (OSError, json.JSONDecodeError):
                        partial = {"rows": [], "markdown": "", "summary": []}
                    reports[t.name] = {**partial, "table": t.name, "what": t.what,
                                       "status": f"not finished: the run was stopped ({stopped})"}
    shutil.rmtree(scratch, ignore_errors=True)
    meta["elapsed_s"] = time.time() - t0
    summary = write_out(args.out, meta, reports, order)
    files = sorted(p.name for p in args.out.iterdir())
    print("\n" + summary + f"\n\n== wrote {', '.join(files)} to {args.out} in {meta['elapsed_s']:.0f} s", flush=True)
    if stopped:
        return 143
    return 0 if all(r.get("status", "").startswith(("done", "stopped")) for r in reports.values()) else 1


def run_all(tables, deadline_s, t0, scratch, log, env_vars, reports, meta, out, order) -> None:
    """The tables one after the other, each with its budget; OUT rewritten after each."""
    for i, t in enumerate(tables):
        left = deadline_s - (time.time() - t0) - EXIT_GRACE_S - 2.0  # and 2 s to write OUT
        later = sum(x.min_s(deadline_s) for x in tables[i + 1:])
        last = i == len(tables) - 1
        budget = left if last else min(t.budget(deadline_s), left - later)
        if budget < t.min_s(deadline_s):  # give it its minimum and squeeze the later ones
            budget = min(left, t.min_s(deadline_s)) if left >= 0.5 * t.min_s(deadline_s) else 0.0
        if budget <= 0:
            reports[t.name] = {"table": t.name, "status": f"not run: {left:.0f} s left of the deadline",
                               "rows": [], "markdown": "", "summary": [], "what": t.what}
            print(f"==== {t.name}: {reports[t.name]['status']}", flush=True)
        else:
            reports[t.name] = run_table(t, budget, scratch, log, env_vars)
        meta["elapsed_s"] = time.time() - t0
        write_out(out, meta, reports, order)


if __name__ == "__main__":
    sys.exit(main())
