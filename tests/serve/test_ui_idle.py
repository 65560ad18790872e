"""An idle server with the Gradio UI mounted stays idle: Gradio's queue polls every 1 ms by default on Linux
(~1,800 wake-ups a second, issue 20); serve/ui.py slows its polling. Counted as the kernel's context switches
of every thread of a real `quickstep-serve` process, so the measure is what a replica costs its host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

IDLE_S = 3.0
MAX_WAKEUPS_PER_S = 200  # measured: ~30/s with the fix, ~10/s without the UI, ~1,100/s before


def context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines()
                     if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_idle_server_with_ui_does_not_spin(free_port: int) -> None:
    """The bundled default model (no export needed), UI mounted, nothing asked of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKSTEP_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", ORT_DISABLE_TELEMETRY="1")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "quickstep-serve"), "--host", "127.0.0.1", "--port", str(free_port), "--intra-op-threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{free_port}/health/ready", timeout=5).status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server was not ready in 120 s"
                time.sleep(0.2)
        time.sleep(2.0)  # let start-up work settle
        before, t0 = context_switches(proc.pid), time.monotonic()
        time.sleep(IDLE_S)
        rate = (context_switches(proc.pid) - before) / (time.monotonic() - t0)
        print(f"idle context switches: {rate:.0f}/s")
        assert rate < MAX_WAKEUPS_PER_S, f"an idle server with the UI switched context {rate:.0f} times a second"
    finally:
        proc.terminate()
        proc.wait(30)
