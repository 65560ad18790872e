"""Summaries for scripts/device_suite.sh: standard library only (runs before and after the project is importable).

    python3 scripts/device_report.py train RUN_DIR... --out train.json     # the time-boxed training runs
    python3 scripts/device_report.py report WORK OUT                       # results.json + results.md in OUT

`report` reads WORK/stages.jsonl, WORK/env.json, WORK/pytest.xml and OUT/{bench_generation,bench_training,train,
serve}.json (whatever exists: a stage that failed or timed out is reported as such, never invented), and checks
the issue-21 targets.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TARGETS = {
    "cifar_1step_b256_roofline": "CIFAR-sized 1-step generation at batch >= 256 reaching 40% of the measured bf16 "
                                 "matmul rate",
    "jvp_over_forward": "JVP <= 1.5x a forward in bf16",
    "scd_over_dsm": "sCD step <= 2x a DSM step",
    "http_overhead": "HTTP <= 1 ms over the backend call",
}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_summary(run: Path) -> dict[str, Any]:
    """Steps, images/s and whether the loss went down, from a run directory's log.jsonl."""
    try:
        recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        return {"run": run.name, "error": f"no log.jsonl: {e}"}
    if not recs:
        return {"run": run.name, "error": "empty log.jsonl"}
    ips = [r["img_per_s"] for r in recs[1:]] or [recs[0]["img_per_s"]]  # the first interval holds start-up
    k = max(1, len(recs) // 4)
    first = statistics.fmean(r["loss"] for r in recs[:k])
    last = statistics.fmean(r["loss"] for r in recs[-k:])
    return {"run": run.name, "steps": recs[-1]["step"], "intervals": len(recs),
            "images_per_s_median": statistics.median(ips), "loss_first_quarter": first, "loss_last_quarter": last,
            "loss_went_down": last < first}


def pytest_summary(xml: Path) -> dict[str, Any] | None:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    out: dict[str, Any] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["time_s"] = float(suite.get("time", 0))
    out["failed"], out["skipped_reasons"] = [], {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                out["failed"].append({"test": name, "message": (el.get("message") or "")[:300]})
        sk = case.find("skipped")
        if sk is not None:
            reason = (sk.get("message") or "")[:120]
            out["skipped_reasons"][reason] = out["skipped_reasons"].get(reason, 0) + 1
    return out


def _fmt(v: Any, nd: int = 1) -> str:
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else "-"


def report(work: Path, out: Path) -> dict[str, Any]:
    stages = [json.loads(x) for x in (work / "stages.jsonl").read_text().splitlines() if x.strip()] \
        if (work / "stages.jsonl").is_file() else []
    res: dict[str, Any] = {"env": _load(work / "env.json"), "stages": stages,
                           "pytest_gpu": pytest_summary(work / "pytest.xml"),
                           "generation": _load(out / "bench_generation.json"),
                           "training": _load(out / "bench_training.json"), "train_run": _load(out / "train.json"),
                           "serve": _load(out / "serve.json")}
    targets: dict[str, Any] = {}
    gen = res["generation"] or {}
    cifar = [r for r in gen.get("rows", []) if r.get("model") == "cifar" and r.get("method") == "scm1"
             and r.get("batch", 0) >= 256 and r.get("roofline_frac")]
    if cifar:
        best = max(cifar, key=lambda r: r["roofline_frac"])
        targets["cifar_1step_b256_roofline"] = {"measured": best["roofline_frac"], "target": 0.40,
                                                "met": best["roofline_frac"] >= 0.40,
                                                "best": f"{best['backend']} {best['precision']} b{best['batch']}"}
    tr = res["training"] or {}
    jvp = tr.get("jvp") or {}
    fwd = jvp.get("forward (no grad)")
    method = "JVP forward_ad (fp32)"  # the trainer's default JVP (exact); the finite difference is in the table
    if fwd and method in jvp:
        r = jvp[method] / fwd
        targets["jvp_over_forward"] = {"measured": r, "target": 1.5, "met": r <= 1.5,
                                       "best": f"{method} vs forward ({'bf16' if tr.get('amp') else 'fp32'})"}
    steps = tr.get("steps") or {}
    if steps.get("DSM") and steps.get("sCD"):
        r = steps["sCD"] / steps["DSM"]
        targets["scd_over_dsm"] = {"measured": r, "target": 2.0, "met": r <= 2.0}
    srv = res["serve"] or {}
    mode = (srv.get("modes") or {}).get("on") or {}
    if "http_overhead_p50_ms" in mode:
        targets["http_overhead"] = {"measured": mode["http_overhead_p50_ms"], "target": 1.0,
                                    "met": mode["http_overhead_p50_ms"] <= 1.0,
                                    "cpu_overhead_ms": mode.get("http_cpu_overhead_ms")}
    res["targets"] = targets
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(markdown(res))
    return res


def markdown(res: dict[str, Any]) -> str:
    env = res.get("env") or {}
    lines = [f"# Quickstep device suite ({env.get('mode', '?')})", "",
             f"{env.get('device', '?')} | torch {env.get('torch', '?')} | python {env.get('python', '?')} | "
             f"{env.get('date', '')}", "", "## Stages", "", "| stage | status | seconds | timeout |",
             "|---|---|---:|---:|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s.get('timeout', '')} |" for s in res["stages"]]
    p = res.get("pytest_gpu")
    if p:
        lines += ["", f"## pytest -m gpu: {p['tests']} tests, {p['failures'] + p['errors']} failed, "
                      f"{p['skipped']} skipped ({p['time_s']:.0f} s)", ""]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in p["failed"]]
        lines += [f"- skipped x{n}: {why}" for why, n in p["skipped_reasons"].items()]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for key, what in TARGETS.items():
        t = res["targets"].get(key)
        if t is None:
            lines.append(f"| {what} | not measured | - |")
        else:
            m = t["measured"]
            shown = f"{100 * m:.1f}%" if key == "cifar_1step_b256_roofline" else f"{m:.2f}"
            lines.append(f"| {what} | {shown} {t.get('best', '')} | {'yes' if t['met'] else 'NO'} |")
    gen = res.get("generation")
    if gen:
        lines += ["", f"## Generation (peak {gen.get('peak_flops', 0) / 1e12:.1f} TFLOP/s "
                      f"{gen.get('peak_dtype', '')} matmul)", "",
                  "| model | method | backend | precision | batch | latency ms | images/s | % of peak | note |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for r in gen.get("rows", []):
            rf = f"{100 * r['roofline_frac']:.1f}" if r.get("roofline_frac") else "-"
            lines.append(f"| {r['model']} | {r['method']} | {r['backend']} | {r['precision']} | {r['batch']} | "
                         f"{_fmt(r.get('latency_ms'), 2)} | {_fmt(r.get('images_per_s'))} | {rf} | {r['note']} |")
    tr = res.get("training")
    if tr:
        lines += ["", f"## Training step ({tr.get('model')}, batch {tr.get('batch')}, {tr.get('device')})", "",
                  "| objective | step ms | images/s | x DSM |", "|---|---:|---:|---:|"]
        dsm = (tr.get("steps") or {}).get("DSM")
        for k, ms in (tr.get("steps") or {}).items():
            lines.append(f"| {k} | {ms:.1f} | {tr['batch'] / (ms / 1e3):.0f} | {_fmt(ms / dsm if dsm else None, 2)} |")
        jvp = tr.get("jvp") or {}
        fwd = jvp.get("forward (no grad)")
        lines += ["", "| call | ms | x forward (no grad) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.1f} | {_fmt(v / fwd if fwd else None, 2)} |" for k, v in jvp.items()]
    run = res.get("train_run")
    if run:
        lines += ["", "## Time-boxed training runs", "", "| run | steps | images/s | loss first quarter | "
                  "loss last quarter | went down |", "|---|---:|---:|---:|---:|---|"]
        for r in run.get("runs", []):
            lines.append(f"| {r['run']} | {r.get('steps', '-')} | {_fmt(r.get('images_per_s_median'))} | "
                         f"{_fmt(r.get('loss_first_quarter'), 4)} | {_fmt(r.get('loss_last_quarter'), 4)} | "
                         f"{r.get('loss_went_down', r.get('error', '-'))} |")
    srv = res.get("serve")
    if srv:
        b = srv.get("backend_call", {})
        lines += ["", f"## Serving ({' '.join(srv.get('server_args', []))})", "",
                  f"backend call p50 {_fmt(b.get('p50_ms'), 2)} ms, p99 {_fmt(b.get('p99_ms'), 2)} ms; batch p50 "
                  f"{json.dumps(b.get('batch_p50_ms', {}))}", ""]
        for mode, m in (srv.get("modes") or {}).items():
            lines.append(f"- batching {mode}: HTTP p50 {_fmt(m.get('http_p50_ms'), 2)} ms (over backend "
                         f"{_fmt(m.get('http_overhead_p50_ms'), 2)} ms wall, {_fmt(m.get('http_cpu_overhead_ms'), 2)} "
                         "ms CPU); " + "; ".join(f"{k.replace('_', ' ')}: {_fmt(v.get('images_per_s'))} images/s"
                                                for k, v in m.items() if k.startswith("clients_")))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "train":
        if "--out" not in argv:
            raise SystemExit("usage: device_report.py train RUN_DIR... --out FILE")
        i = argv.index("--out")
        runs = [train_summary(Path(p)) for p in argv[1:i]]
        Path(argv[i + 1]).write_text(json.dumps({"runs": runs}, indent=1))
        print(json.dumps(runs, indent=1))
        return 0
    if len(argv) == 3 and argv[0] == "report":
        res = report(Path(argv[1]), Path(argv[2]))
        print(markdown(res))
        return 0
    raise SystemExit("usage: device_report.py train RUN_DIR... --out FILE | report WORK OUT")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
