"""Schemathesis fuzzing of a real `quickstep-serve` over HTTP, driven by the server's own /openapi.json (issue 12).

    .venv/bin/python tests/benchmarks/fuzz.py [--bundle DIR | --url URL] [--cases 1200] [--api-key KEY]
        [--json out.json]

Every operation of the schema gets positive (schema-valid) and negative (schema-violating) cases, about
`--cases` in all. The server is ready and unloaded and the cases are sent one at a time, so checks: no 5xx
at all (a crash, backend failure, not-ready or shutting-down answer is a failure; generated X-Timeout-Ms
deadlines are raised to MIN_DEADLINE_MS first so that a legitimate 504 cannot occur), no 429 (unless the caller
deliberately runs a tiny queue: `allow_queue_full`), documented status codes, content types, headers and
response bodies (status_code_conformance, content_type_conformance, response_headers_conformance,
response_schema_conformance) and negative data rejected with a 4xx (negative_data_rejection).
Prints a table per operation and the distinct failures; writes JSON; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CHECK_NAMES = ("status_code_conformance", "content_type_conformance",
               "response_headers_conformance", "response_schema_conformance", "negative_data_rejection")


@dataclass
class FuzzReport:
    """Cases run per operation and mode, statuses seen, and the distinct failures (check, operation, message)."""

    cases: int = 0
    per_operation: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(v for k, v in self.statuses.items() if k.startswith("5"))


BODY_WEIGHT = 4  # an operation with a request body gets this many times the cases of one without
# A generated X-Timeout-Ms below this (the server's default 30 s cap) is raised to it before sending: a fuzzed
# 1 ms deadline would make a 504 legitimate, and this fuzzer accepts no 5xx (tests/serve/test_limits.py covers 504).
MIN_DEADLINE_MS = 30_000
_PLAIN_NUMBER = re.compile(r"\s*(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def raise_short_deadlines(case: Any) -> None:
    """Raise a valid, positive X-Timeout-Ms shorter than MIN_DEADLINE_MS to it (anything else is left as generated,
    so malformed, zero and negative values are still fuzzed)."""
    headers = case.headers or {}
    for name, value in list(headers.items()):
        if name.lower() == "x-timeout-ms" and isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value):
            if 0 < float(value) < MIN_DEADLINE_MS:
                headers[name] = str(MIN_DEADLINE_MS)


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """Any 5xx fails, whatever its error code (not_ready, backend_failure, shutting_down, deadline_exceeded, ...).
    Stricter than schemathesis' not_a_server_error, which a schemathesis.toml could relax."""
    if response.status_code >= 500:
        try:
            code = json.loads(response.content)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        raise AssertionError(f"server error {response.status_code} (error code {code!r}): {response.content[:200]!r}")


def checks_for(*, allow_queue_full: bool = False) -> list[Any]:
    """No 5xx of any kind, no 429 unless allowed, and CHECK_NAMES."""
    import schemathesis.checks as checks

    def no_queue_full(ctx: Any, response: Any, case: Any) -> None:
        """One request at a time to an unloaded server never fills its queue."""
        if response.status_code == 429 and not allow_queue_full:
            raise AssertionError(f"429 from an unloaded server fuzzed sequentially: {response.content[:200]!r}")

    return [no_server_error, no_queue_full] + [getattr(checks, n) for n in CHECK_NAMES]


def run_fuzz(url: str, cases: int, *, headers: dict[str, str] | None = None, seed: int = 0,
             request_timeout_s: float = 60.0, allow_queue_full: bool = False) -> FuzzReport:
    """Fuzz every operation of url/openapi.json, positive and negative cases, in rounds (seed, seed+1, ...) until
    `cases` requests are sent one at a time; failures are collected (deduplicated), not raised, so one run reports
    them all. Any 5xx is a failure; a 429 too unless `allow_queue_full` (for a server deliberately run with a
    tiny queue)."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis import GenerationMode
    from schemathesis.core.failures import Failure, FailureGroup

    schema = schemathesis.openapi.from_url(url.rstrip("/") + "/openapi.json", headers=headers or {})
    ops = [r.ok() for r in schema.get_all_operations()]
    report = FuzzReport()
    statuses: Counter = Counter()
    seen: set[tuple[str, str, str]] = set()
    checks = checks_for(allow_queue_full=allow_queue_full)
    t0 = time.perf_counter()
    def make_test(op: Any, mode: Any, label: str, count: list[int], examples: int, rnd: int) -> Any:
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                             report_multiple_bugs=False)
        @hypothesis.seed(rnd)
        def one(case: Any) -> None:
            count[0] += 1
            raise_short_deadlines(case)
            response = case.call(base_url=url, headers=headers, timeout=request_timeout_s)
            statuses[str(response.status_code)] += 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (FailureGroup, Failure, AssertionError) as e:
                group = e.exceptions if isinstance(e, FailureGroup) else [e]
                for f in group:
                    title = getattr(f, "title", type(f).__name__)
                    msg = str(getattr(f, "message", f)).strip().splitlines()
                    key = (label, title, msg[0] if msg else "")
                    if key not in seen:
                        seen.add(key)
                        report.failures.append({
                            "operation": label, "mode": mode.value, "check": title,
                            "message": "\n".join(msg[:6]), "status": str(response.status_code),
                            "request": f"{case.method} {case.formatted_path} body={str(case.body)[:200]} "
                                       f"headers={case.headers} query={case.query}",
                            "response": response.text[:300]})

        return one

    slots = [(op, mode) for op in ops for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    for rnd in range(50):  # rounds with fresh seeds until `cases` are run; input-less operations drop out
        if report.cases >= cases or not slots:
            break
        weights = [BODY_WEIGHT if op.body else 1 for op, _ in slots]  # bodies have the most to get wrong
        remaining = cases - report.cases
        productive = []
        for (op, mode), w in zip(slots, weights, strict=True):
            examples = max(1, -(-remaining * w // sum(weights)))
            label = f"{op.method.upper()} {op.path}"
            count = [0]
            try:
                make_test(op, mode, label, count, examples, seed + rnd)()
            except hypothesis.errors.Unsatisfiable:  # nothing to violate (an operation without inputs)
                pass
            key = f"{label} [{mode.value}]"
            report.per_operation[key] = report.per_operation.get(key, 0) + count[0]
            report.cases += count[0]
            if count[0] > 1:
                productive.append((op, mode))
        slots = productive
    report.statuses = dict(sorted(statuses.items()))
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def print_report(report: FuzzReport) -> None:
    print(f"{'operation [mode]':<48} {'cases':>6}")
    print("-" * 55)
    for k, v in report.per_operation.items():
        print(f"{k:<48} {v:>6}")
    print(f"{'total':<48} {report.cases:>6}   ({report.seconds:.1f} s)")
    print("statuses:", report.statuses)
    print(f"distinct failures: {len(report.failures)}")
    for f in report.failures:
        print(f"- [{f['check']}] {f['operation']} ({f['mode']}, {f['status']}): {f['message']}\n    {f['request']}\n"
              f"    -> {f['response']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to serve (default: export a tiny 1x8x8 one)")
    ap.add_argument("--url", help="fuzz an already running server instead of starting one")
    ap.add_argument("--cases", type=int, default=1200, help="generated cases in all (>= 1000 for the issue)")
    ap.add_argument("--api-key", help="serve with (or send) this API key")
    ap.add_argument("--json", type=Path, default=Path("runs/reliability/fuzz.json"))
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server subprocess too
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    server_log = ""
    if a.url:
        report = run_fuzz(a.url, a.cases, headers=headers)
    else:
        from tests.helpers import ServerProcess

        with tempfile.TemporaryDirectory(prefix="quickstep-fuzz-") as tmp:
            if a.bundle is None:
                from tests.serve.conftest import make_bundle

                bundle = make_bundle(Path(tmp))
            else:
                bundle = a.bundle
            env = {"QUICKSTEP_API_KEYS": a.api_key} if a.api_key else None
            with ServerProcess([bundle], ["--log-level", "warning"], env=env) as srv:
                srv.wait_ready()
                report = run_fuzz(srv.url, a.cases, headers=headers)
                alive = srv.proc.poll() is None
                server_log = srv.log()
            if not alive:
                report.failures.append({"check": "server died", "operation": "-", "mode": "-", "status": "-",
                                        "message": server_log[-2000:], "request": "", "response": ""})
    print_report(report)
    if "Traceback" in server_log:
        print("server log holds a traceback:\n" + server_log[-3000:])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({**asdict(report), "server_errors": report.server_errors}, indent=1))
    print(f"wrote {a.json}")
    ok = not report.failures and report.server_errors == 0
    print("PASS" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
