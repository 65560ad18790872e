"""scripts/device_suite.sh (issue 21) in --smoke mode on CPU: the same stages as on the H200 with tiny sizes, so the
one-command GPU suite cannot rot before a GPU run.  ~1 minute on an idle 2-core machine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "scripts" / "device_suite.sh"
STAGES = ["pytest_gpu", "bench_generation", "bench_training", "train_teacher_scd", "serve"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "HOME": str(Path.home())})


def test_smoke_mode_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out), "--budget", "420", timeout=480)  # a generous budget: shared CI cores
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-2000:])
    res = json.loads((out / "results.json").read_text())
    assert [s["stage"] for s in res["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in res["stages"]), res["stages"]
    assert res["env"]["mode"] == "smoke" and res["pytest_gpu"]["tests"] > 0
    assert {r["precision"] for r in res["generation"]["rows"]} == {"fp32", "bf16-weights"}
    assert all(r["images_per_s"] > 0 for r in res["generation"]["rows"])
    assert {"DSM", "DSM+CP", "DSM+FP", "STF", "sCT", "sCD"} <= set(res["training"]["steps"])
    runs = {r["run"]: r for r in res["train_run"]["runs"]}
    assert set(runs) == {"teacher", "student"} and all(r["steps"] > 0 and r["images_per_s_median"] > 0
                                                       for r in runs.values())
    assert res["serve"]["backend"] == "torch" and res["serve"]["modes"]["on"]["clients_2"]["images_per_s"] > 0
    assert set(res["targets"]) >= {"jvp_over_forward", "scd_over_dsm", "http_overhead"}
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "## Time-boxed training runs" in md and "| serve | ok |" in md
    # what the device tool returns from $OUT: at most 8 plain files with plain names
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["suite.log", "results.json", "results.md", "bench_generation.json",
                            "bench_training.json", "train.json", "serve.json"])
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files) and len(files) <= 8
    assert "BEGIN serve" in (out / "suite.log").read_text()


def test_bad_options_and_a_cpu_host_fail_clearly(tmp_path):
    proc = _run("--fast", timeout=30)
    assert proc.returncode == 2 and "unknown option '--fast' (allowed: --smoke" in proc.stderr
    proc = _run("--out", str(tmp_path), "--budget", "30", timeout=120)  # GPU mode on a CPU machine
    assert proc.returncode == 1 and "no CUDA device here: run with --smoke" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["stages"][0]["status"].startswith("failed: no CUDA")


