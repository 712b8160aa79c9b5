"""What every bench script shares: a JSON report rewritten after each row, and a deadline.

A bench script given ``--json PATH`` rewrites PATH after every row it measures (atomically:
a temporary file, then a rename), so a run that stops at its deadline, or is killed, still
leaves every finished row and says what it did not reach. ``--deadline-at EPOCH`` (what
``bench/gpu_run.py`` passes) or ``--budget-s S`` (seconds from the script's start) make the
script skip the rows that would not fit, and mark them, instead of running past its budget.

The report (one JSON object):
    table     the table's name ("train_step", ...)
    status    "running" | "done" | "stopped: deadline" (rows were skipped) | "stopped: signal"
    meta      what the rows were measured on (shapes, device, settings)
    rows      one dict per measured row, in order
    skipped   {row name: why} for the planned rows that were not measured
    current   what was being measured when the report was last written (None between rows)
    markdown  the table as markdown (rewritten with the rows so far)
    summary   short lines: each target and whether it was met
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

T_START = time.time()  # about the script's start: this module is imported before any model is built


def add_args(ap) -> None:
    """The options every bench script takes for the GPU run."""
    ap.add_argument("--json", type=Path, default=None, help="rewrite this JSON report after every row")
    ap.add_argument("--deadline-at", type=float, default=None,
                    help="wall-clock time (epoch seconds) by which the table must be finished: rows that "
                         "would not fit are skipped and marked")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the same as a number of seconds from the script's start")


def _on_sigterm(signum, frame):  # a budget's hard stop: unwind, so temporary caches are removed
    raise SystemExit(128 + signum)


class Report:
    """One table's rows as they are measured; see the module docstring for the JSON."""

    def __init__(self, args, table: str, planned: list[str] | tuple[str, ...] = ()):
        self.path: Path | None = args.json
        ends = [t for t in (args.deadline_at, T_START + args.budget_s if args.budget_s else None) if t]
        self.deadline = min(ends) if ends else math.inf
        self.data = {"table": table, "status": "running", "meta": {}, "rows": [], "planned": list(planned),
                     "skipped": {}, "markdown": "", "summary": [], "notes": []}
        signal.signal(signal.SIGTERM, _on_sigterm)
        self.write()

    # ---- time ----
    def left(self) -> float:
        """Seconds to the deadline (inf without one)."""
        return self.deadline - time.time()

    def fits(self, need_s: float) -> bool:
        return self.left() >= need_s

    # ---- content ----
    def meta(self, **kw) -> None:
        self.data["meta"].update(kw)
        self.write()

    def note(self, line: str) -> None:
        self.data["notes"].append(line)
        print(line, file=sys.stderr)
        self.write()

    def doing(self, what: str) -> None:
        """Say what is being measured now (a run killed at its budget names it)."""
        self.data["current"] = what
        self.write()

    def row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.data["current"] = None
        self.write()

    def skip(self, name: str, why: str) -> None:
        self.data["skipped"][name] = why
        self.data["status"] = "stopped: deadline" if "deadline" in why or "budget" in why else self.data["status"]
        print(f"skipped {name}: {why}", file=sys.stderr)
        self.write()

    def render(self, markdown: str, summary: list[str] | None = None) -> None:
        self.data["markdown"] = markdown
        if summary is not None:
            self.data["summary"] = summary
        self.write()

    def finish(self) -> None:
        if self.data["status"] == "running":
            self.data["status"] = "done"
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_plain))
        os.replace(tmp, self.path)


def _plain(x):
    """JSON for what json does not know: numpy scalars, paths, devices."""
    try:
        return x.item()
    except AttributeError:
        return str(x)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, columns padded so that it also reads in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def fmt(x, spec: str = "{:.2f}", missing: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    return spec.format(x)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")
