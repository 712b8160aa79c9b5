"""`kdcache demo --quick` end to end: data, teacher, caches, three students, eval, table, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_quick_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "kdcache.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    for f in ("report.json", "accuracy.png", "losses.png", "training_curves.png", "agreement.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["summary"]) >= {"teacher", "baseline PT-SFT", "baseline +SFT", "LLaVA-KD"}
    # the quick sizes are a smoke test and say so, with no accuracy table to misread
    assert "SMOKE TEST" in r.stdout and "avg" not in r.stdout and "baseline PT-SFT" in r.stdout
    # the full demo's table (in the report) names every question type, every model and the gap column
    for word in ("colour", "shape", "count", "position", "yesno", "LLaVA-KD", "baseline +SFT", "gap closed"):
        assert word in rep["table"]
    # the matched-steps baseline really got as many extra steps as DFT
    assert rep["steps"]["baseline +SFT"] == rep["steps"]["LLaVA-KD"]
    # the distilled student was compared with the teacher on held-out response positions
    kd = rep["results"]["LLaVA-KD"][0]["agreement"]
    assert kd["positions"] > 0 and 0.0 <= kd["top1_agreement"] <= 1.0 and kd["kl"] >= 0.0


def test_gap_closed_is_paired_per_seed():
    from kdcache.demo import gap_closed

    # teacher 0.9; baselines 0.5 / 0.7; students 0.7 / 0.7 -> half the first gap, none of the second
    assert gap_closed(0.9, [0.5, 0.7], [0.7, 0.7]) == pytest.approx([0.5, 0.0])
    assert gap_closed(0.9, [0.5], [0.9]) == pytest.approx([1.0])
    assert gap_closed(0.9, [0.5], [0.3]) == pytest.approx([-0.5])
    assert gap_closed(0.5, [0.5, 0.4], [0.6, 0.6]) is None  # no gap on some seed: no fraction
