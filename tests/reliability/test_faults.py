"""Faults (issue 12, part 3): disconnecting clients, a failing backend, SIGTERM with work in flight, a trainer
SIGKILLed while writing a checkpoint, and corrupted bundles - all against the real components."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.helpers import ServerProcess, metric_samples, metric_total
from tests.serve.conftest import serve

MODEL = "tiny-consistency"
HEAVY = {"n": 16, "steps": 2}  # a large request: with max_batch=1 on the busy model, tens of ms of backend each
BUSY_BUNDLE = Path(__file__).resolve().parents[2] / "serve" / "bundled" / "digits-direct-cm"


@pytest.fixture(scope="module")
def busy_bundle() -> Path:
    """The shipped digits-direct-cm bundle (a real 0.7M-parameter UNet at 16x16). The queueing tests need a backend slow
    enough that requests pile up behind max_batch=1: the tiny 8x8 model answers faster than HTTP can deliver
    requests on a fast machine, so its queue may never build."""
    if not (BUSY_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"the bundled model is missing: {BUSY_BUNDLE}")
    return BUSY_BUNDLE


def wait_queue(url: str, depth: int, timeout: float = 30.0) -> None:
    """Until /metrics shows at least `depth` requests queued."""
    deadline = time.monotonic() + timeout
    while metric_total(metric_samples(url), "quickstep_queue_depth") < depth:
        assert time.monotonic() < deadline, f"the queue never reached {depth}"
        time.sleep(0.005)


def wait_received(url: str, n: int, timeout: float = 30.0) -> None:
    """Until the server has read all `n` /v1/generate requests (in progress + answered)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metric_samples(url)
        got = (metric_total(m, "quickstep_requests_in_progress") - 1  # minus this /metrics request
               + metric_total(m, "quickstep_requests_total", route="/v1/generate"))
        if got >= n:
            return
        assert time.monotonic() < deadline, f"the server received only {got} of {n} requests"
        time.sleep(0.005)


def send_and_vanish(port: int, body: bytes) -> None:
    """A complete POST /v1/generate whose client closes the connection without reading the answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


# ----------------------------------------------------------------------------------------------- disconnects
def test_clients_that_vanish_while_queued_cost_no_backend_run(busy_bundle):
    flood, gone = 16, 4
    with serve(bundle=[busy_bundle], max_batch=1, max_wait_ms=0, max_queue=64) as s:
        before = metric_samples(s.url)
        runs0 = metric_total(before, "quickstep_backend_runs_total")
        with ThreadPoolExecutor(flood) as ex:
            futs = [ex.submit(httpx.post, s.url + "/v1/generate", json={**HEAVY, "seed": i}, timeout=120)
                    for i in range(flood)]
            wait_queue(s.url, 4)
            for i in range(gone):
                send_and_vanish(s.port, json.dumps({"seed": 1000 + i}).encode())
            codes = [f.result().status_code for f in futs]
        time.sleep(0.3)
        after = metric_samples(s.url)
        # the server still serves afterwards
        assert httpx.post(s.url + "/v1/generate", json={"seed": 1}, timeout=30).status_code == 200
    assert codes == [200] * flood
    dropped = metric_total(after, "quickstep_requests_dropped_total", reason="client_disconnected")
    runs = metric_total(after, "quickstep_backend_runs_total") - runs0
    assert dropped == gone, dropped
    # max_batch=1 runs each answered request in n single-image chunks; a vanished client's request runs none
    assert runs == flood * HEAVY["n"], f"{runs} backend runs for {flood} answered requests of n={HEAVY['n']} " \
                                       f"({gone} clients vanished)"


# ----------------------------------------------------------------------------------------------- backend failure
def test_backend_exception_fails_only_its_batch(rel_bundle):
    """steps=2 runs on a broken onnxruntime session (the denoiser graph: a real InvalidArgument on every run) while
    steps=1 keeps working; the failures are 503s with a message, never a bare 500; after repair all is well."""
    import onnxruntime as ort

    with serve(bundle=[rel_bundle], max_batch=8, max_wait_ms=2) as s:
        backend = s.app.state.service.models[MODEL].backend
        good = backend.sessions[2]
        backend.sessions[2] = ort.InferenceSession(str(rel_bundle / "denoiser.onnx"),
                                                   providers=["CPUExecutionProvider"])
        try:
            with ThreadPoolExecutor(12) as ex:
                reqs = [{"steps": 1 + (i % 2), "seed": i} for i in range(24)]
                rs = list(ex.map(lambda b: httpx.post(s.url + "/v1/generate", json=b, timeout=60), reqs))
        finally:
            backend.sessions[2] = good
        after = httpx.post(s.url + "/v1/generate", json={"steps": 2, "seed": 3}, timeout=30)
        samples = metric_samples(s.url)
    for b, r in zip(reqs, rs, strict=True):
        if b["steps"] == 1:
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "backend_failure" and MODEL in err["message"] and "failed" in err["message"], err
            assert r.headers.get("retry-after")
    assert after.status_code == 200
    assert metric_total(samples, "quickstep_backend_failures_total") >= 1
    assert metric_total(samples, "quickstep_requests_total", status="500") == 0


# ----------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_in_flight_requests(busy_bundle, tmp_path):
    """SIGTERM while 24 heavy requests are queued or running: every one is answered 200, then the process exits."""
    n = 24
    with ServerProcess([busy_bundle], ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "64"],
                       log_path=tmp_path / "server.log") as srv:
        srv.wait_ready()
        with ThreadPoolExecutor(n) as ex:
            futs = [ex.submit(httpx.post, srv.url + "/v1/generate", json={**HEAVY, "seed": i}, timeout=120)
                    for i in range(n)]
            wait_received(srv.url, n)  # a connection whose request was not yet read is closed at shutdown
            srv.signal(signal.SIGTERM)
            pending_at_signal = sum(not f.done() for f in futs)
            rs = [f.result() for f in futs]
        code = srv.wait(60)
        log = srv.log()
        with pytest.raises(httpx.ConnectError):  # nothing listens any more
            httpx.get(srv.url + "/health/live", timeout=5)
    assert pending_at_signal >= 3, "the signal came after the work was done; the test proved nothing"
    assert [r.status_code for r in rs] == [200] * n, [r.text[:200] for r in rs if r.status_code != 200]
    assert code in (0, -signal.SIGTERM), log[-2000:]  # uvicorn re-raises the signal after a clean shutdown
    assert "Traceback" not in log, log[-3000:]


# ----------------------------------------------------------------------------------------------- SIGKILL trainer
TRAIN = [sys.executable, "-m", "quickstep.train.cli", "fit"]
QUIET = ["--set", "log.samples=false", "--set", "log.tensorboard=false", "--set", "log.progress=false",
         "--set", "log.every=1000"]


def _stop(proc: subprocess.Popen) -> None:
    """SIGSTOP `proc` and wait until it is stopped (waitpid WUNTRACED reports that without reaping it)."""
    proc.send_signal(signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):  # it exited meanwhile and waitpid reaped it: tell Popen
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")


def _sigkill_during_save(proc: subprocess.Popen, out: Path, ready, rng: random.Random, timeout: float, *,
                         before: frozenset[str] = frozenset(), require_mid_save: bool = False) -> dict:
    """Poll `out`; once `ready(names)` holds while a save is in progress (a new `.tmp-` directory exists, i.e. one
    not in `before`, which may hold stale ones of earlier kills), wait a random 0-20 ms, SIGSTOP `proc` and list
    `out` again: a stopped trainer can neither finish nor start a save, so that list is exactly what the SIGKILL
    then interrupts. With `require_mid_save`, a save that finished before the stop is let go on (SIGCONT) and the
    next one is tried, so the kill surely lands mid-save. Returns the exit code and the new temporary
    directories present at the kill (`saving_at_kill`, empty when it came between saves)."""
    deadline = time.monotonic() + timeout
    saving: list[str] = []
    try:
        while True:
            names = (set(os.listdir(out)) if out.is_dir() else set()) - before
            if any(".tmp-" in n for n in names) and ready(names):
                time.sleep(rng.uniform(0.0, 0.02))
                _stop(proc)
                saving = sorted(n for n in set(os.listdir(out)) - before if ".tmp-" in n)
                if saving or not require_mid_save:
                    proc.send_signal(signal.SIGKILL)
                    break
                proc.send_signal(signal.SIGCONT)
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no checkpoint save observed" + (" mid-save" if saving else "")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()
    return {"returncode": proc.returncode, "saving_at_kill": saving}


def _checkpoints(names) -> list[str]:
    return [n for n in names if re.fullmatch(r"step-\d+", n)]


def kill_while_saving(out: Path, min_done: int, rng: random.Random, timeout: float = 120.0, *,
                      require_mid_save: bool = False, run: list[str] | None = None) -> dict:
    """Start gmm2d-plain (or the `run` arguments) with a checkpoint every step; once `min_done` checkpoints exist,
    SIGKILL it at a random moment while a save is in progress (a `.step-*.tmp-*` directory exists); see
    `_sigkill_during_save`."""
    run = run or ["--preset", "gmm2d-plain", *QUIET]
    proc = subprocess.Popen(TRAIN + [*run, "--out", str(out), "--steps", "100000", "--set", "log.ckpt_every=1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before = frozenset(os.listdir(out)) if out.is_dir() else frozenset()
    return _sigkill_during_save(proc, out, lambda names: len(_checkpoints(names)) >= min_done, rng, timeout,
                                before=before, require_mid_save=require_mid_save)


def latest_loadable(out: Path) -> int:
    """The newest checkpoint of a run loads (weights + state); returns its step."""
    from quickstep.train.core.checkpoint import load_model, load_state
    from quickstep.train.loop import find_checkpoint

    ckpt = find_checkpoint(out)
    load_model(ckpt, which="ema")
    load_model(ckpt, which="raw")
    step = int(load_state(ckpt)["step"])
    assert ckpt.name == f"step-{step:07d}", (ckpt, step)
    return step


def resume(out: Path, steps: int) -> None:
    r = subprocess.run(TRAIN + ["--out", str(out), "--resume", str(out), "--steps", str(steps)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_sigkill_during_checkpoint_save_then_resume(tmp_path):
    """One SIGKILL that surely lands while a checkpoint is half-written (the trainer is SIGSTOPped first and a save's
    `.tmp-` directory is seen at that moment); the newest complete checkpoint loads and the run resumes from it."""
    rng = random.Random(int(time.time()))
    out = tmp_path / "run"
    info = kill_while_saving(out, min_done=2, rng=rng, require_mid_save=True)
    assert info["returncode"] == -signal.SIGKILL
    assert info["saving_at_kill"], "the kill did not land during a checkpoint save"
    assert set(info["saving_at_kill"]) <= set(os.listdir(out)), "the half-written checkpoint is left behind"
    step = latest_loadable(out)
    assert step >= 2
    resume(out, step + 2)
    assert latest_loadable(out) == step + 2


def test_sigkill_mid_epoch_of_a_streamed_run_resumes_the_same_batches(tmp_path):
    """[issue 23] A run streaming an EDM zip through DataLoader workers (x-flip on: 2 x 24 indices per epoch, 8 per
    step) is SIGKILLed during a save mid-epoch (batches prefetched beyond the checkpoint are lost with it); the
    resumed run ends with weights bit-identical to an uninterrupted run's: it drew the same batches. (The reference
    run is a subprocess too: bit-exactness holds for the same intra-op thread count.)"""
    from tests.train.test_pipeline import make_edm_zip

    make_edm_zip(tmp_path / "set.zip", n=24, size=(8, 8))
    run = ["--preset", "images-small", "--data", str(tmp_path / "set.zip"), "--set", "data.resolution=8",
           "--set", "data.xflip=true", "--set", "batch_size=8", "--set", "log.keep_checkpoints=0",
           "--set", "model.backbone={model_channels = 8, channel_mult = [1], num_blocks = 1, attn_resolutions = [], "
           "time_scale = 10.0}", *QUIET]
    steps = 9
    whole = subprocess.run(TRAIN + [*run, "--out", str(tmp_path / "whole"), "--steps", str(steps)],
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    info = kill_while_saving(out, min_done=2, rng=random.Random(int(time.time())), run=run)
    assert info["returncode"] == -signal.SIGKILL
    step = latest_loadable(out)
    from quickstep.train.core.checkpoint import load_model

    assert 2 <= step < steps
    resume(out, steps)
    a = load_model(tmp_path / "whole" / f"step-{steps:07d}", which="raw").state_dict()
    b = load_model(out / f"step-{steps:07d}", which="raw").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_many_times_during_saves(tmp_path):
    """Ten kills at random moments of saves (every other one surely mid-save), each followed by a check that the run
    loads, on one run directory (stale half-written checkpoints accumulate); then resume to the end and compare
    with the step count."""
    rng = random.Random(0)
    out = tmp_path / "run"
    steps, mid_save = [], 0
    for i in range(10):
        if i == 0:
            info = kill_while_saving(out, min_done=1, rng=rng, require_mid_save=True)
        else:  # a resumed run killed again while saving
            info = kill_resumed_while_saving(out, rng, require_mid_save=i % 2 == 0)
        assert info["returncode"] == -signal.SIGKILL
        mid_save += bool(info["saving_at_kill"])
        steps.append(latest_loadable(out))
    print(f"10 SIGKILLs, {mid_save} with a checkpoint half-written; steps after each: {steps}")
    assert mid_save >= 5, "the kills missed the saves"
    assert steps == sorted(steps)
    resume(out, steps[-1] + 3)
    assert latest_loadable(out) == steps[-1] + 3


def kill_resumed_while_saving(out: Path, rng: random.Random, timeout: float = 120.0, *,
                              require_mid_save: bool = False) -> dict:
    """`--resume` the run for many more steps and SIGKILL it during one of its first saves."""
    start = frozenset(os.listdir(out))
    proc = subprocess.Popen(TRAIN + ["--out", str(out), "--resume", str(out), "--steps", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    min_new = rng.randint(0, 2)
    return _sigkill_during_save(proc, out, lambda names: len(_checkpoints(names)) >= min_new, rng, timeout,
                                before=start, require_mid_save=require_mid_save)


# ----------------------------------------------------------------------------------------------- corrupt bundles
def flip_bytes(path: Path, offset: int = 4096, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage,words", [
    (lambda b: flip_bytes(b / "generator_1step.onnx"), ["generator_1step.onnx", "sha256", "corrupt"]),
    (lambda b: truncate(b / "generator_2step.onnx"), ["generator_2step.onnx", "truncated", "corrupt"]),
    (lambda b: (b / "model.safetensors").unlink(), ["model.safetensors", "missing"]),
    (lambda b: truncate(b / "manifest.json", 0.7), ["manifest.json", "not valid json"]),
], ids=["hash-mismatch", "truncated-onnx", "missing-file", "truncated-manifest"])
def test_corrupt_bundle_refused_at_load(bundle_copy, damage, words):
    from quickstep.serve.app import create_app
    from quickstep.serve.bundle import BundleError
    from quickstep.serve.settings import ServeSettings

    damage(bundle_copy)
    with pytest.raises(BundleError) as e:
        create_app(ServeSettings(bundle=[bundle_copy], ui=False))
    msg = str(e.value).lower()
    assert all(w.lower() in msg for w in words), msg


def test_corrupt_bundle_cli_exits_with_clear_error_and_never_listens(bundle_copy, tmp_path):
    flip_bytes(bundle_copy / "generator_1step.onnx")
    srv = ServerProcess([bundle_copy], log_path=tmp_path / "server.log")
    code = srv.wait(120)
    log = srv.log()
    srv.stop()
    assert code == 2, log
    assert "generator_1step.onnx" in log and "sha256" in log and "Traceback" not in log, log
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health/ready", timeout=5)


def test_unloadable_onnx_without_verification_never_reports_ready(bundle_copy):
    """A truncated ONNX that skips the sha256 check (--no-verify) fails in onnxruntime: the server stays up but
    /health/ready answers 503 naming the failure, and generation answers 503 - never a 500, never ready."""
    truncate(bundle_copy / "generator_2step.onnx")
    with serve(wait_ready=False, bundle=[bundle_copy], verify_sha256=False) as s:
        service = s.app.state.service
        deadline = time.monotonic() + 60
        while not service.loaded.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = httpx.get(s.url + "/health/ready")
        gen = httpx.post(s.url + "/v1/generate", json={"steps": 1})
        live = httpx.get(s.url + "/health/live")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable", ready.text
    assert ready.json()["models"] == {MODEL: False}
    assert gen.status_code == 503 and gen.json()["error"]["code"] == "not_ready"
    assert "generator_2step.onnx" in gen.json()["error"]["message"], gen.text
    assert live.status_code == 200
