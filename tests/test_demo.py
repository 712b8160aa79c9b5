"""`kdcache demo --quick` end to end: data, teacher, caches, three students, eval, table, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_quick_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "kdcache.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    for f in ("report.json", "accuracy.png", "losses.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["summary"]) >= {"teacher", "baseline PT-SFT", "baseline +SFT", "LLaVA-KD"}
    # the table names every question type and every model
    for word in ("colour", "shape", "count", "position", "yesno", "LLaVA-KD", "baseline +SFT"):
        assert word in r.stdout
    # the matched-steps baseline really got as many extra steps as DFT
    assert rep["steps"]["baseline +SFT"] == rep["steps"]["LLaVA-KD"]
    # the distilled student was compared with the teacher on held-out response positions
    kd = rep["results"]["LLaVA-KD"][0]["agreement"]
    assert kd["positions"] > 0 and 0.0 <= kd["top1_agreement"] <= 1.0 and kd["kl"] >= 0.0
