"""The images in a real Docker engine (issue 20). docker/test-local.sh starts a private dockerd, builds the
images on a local base and runs this module with `-m docker` and QUICKSTEP_DOCKER_* set; anywhere else it is
deselected (marker `docker`) or skipped.

Every container is probed from inside its own network namespace (`nsenter -t <pid> -n`, running
tests/docker/local/netns_probe.py with the host's interpreter), so traffic only ever goes to a 127.0.0.1;
the compose balancer and Prometheus are published on the host's 127.0.0.1 only.
Figures (timings, sizes, throughput) go to $QUICKSTEP_DOCKER_RESULTS as JSON; test-local.sh prints them.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.docker.dockerfile import DOCKER as DOCKER_DIR
from tests.docker.dockerfile import REPO
from tests.helpers import free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.environ.get("QUICKSTEP_DOCKER_TEST") != "1",
                       reason="needs the private engine and images of docker/test-local.sh"),
]

DOCKER = os.environ.get("QUICKSTEP_DOCKER_BIN", "docker")
IMAGE = os.environ.get("QUICKSTEP_DOCKER_IMAGE", "quickstep-serve:0.1.0")
WORK = Path(os.environ.get("QUICKSTEP_DOCKER_WORK", "/tmp"))
RESULTS = os.environ.get("QUICKSTEP_DOCKER_RESULTS")
PROBE = Path(__file__).parent / "local" / "netns_probe.py"
OVERRIDE = Path(__file__).parent / "local" / "compose.override.yaml"
VENV_BIN = Path(sys.executable).parent
PORT = 8000  # the image's own port, inside each container's network namespace
UID = 10001
GRACE_S = 20  # docker stop -t: SIGTERM, then SIGKILL after this long
# the single-container run, hardened the way docker/README.md documents it
HARDENED = ["--network", "none", "--read-only", "--tmpfs", "/tmp", "--tmpfs", f"/home/quickstep:uid={UID},gid={UID}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges=true",
            "--memory", "1g", "--memory-swap", "1g", "--cpus", "1", "--pids-limit", "256"]
REQUEST = {"steps": 1, "seed": 1234, "class_label": 7, "scale": 4}
FIGURES: dict[str, object] = {}


def record(**figures: object) -> None:
    FIGURES.update(figures)
    if RESULTS:
        Path(RESULTS).write_text(json.dumps(FIGURES, indent=1, sort_keys=True))


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    return r.stdout.strip()


def logs(container: str) -> str:
    r = subprocess.run([DOCKER, "logs", container], capture_output=True, text=True, timeout=60)
    return (r.stdout + r.stderr)[-4000:]


def inspect(container: str, fmt: str) -> str:
    return docker("inspect", "-f", fmt, container)


def in_netns(pid: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """netns_probe.py ARGS inside the network namespace of process PID (a container's)."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", sys.executable, str(PROBE), *args],
                          capture_output=True, timeout=timeout)


def wait_ready(pid: int, timeout_s: float) -> float | None:
    r = in_netns(pid, "ready", str(PORT), str(timeout_s), timeout=timeout_s + 30)
    return json.loads(r.stdout)["ready_at"]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of NAME whose labels include LABELS (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def generated(pid: int) -> float:
    r = in_netns(pid, "get", str(PORT), "/metrics")
    assert r.returncode == 0, r.stderr.decode()
    return metric(r.stdout.decode(), "quickstep_requests_total", route="/v1/generate", status="200")


@contextlib.contextmanager
def container(*args: str, name: str) -> Iterator[tuple[str, int, float]]:
    """docker run -d ARGS IMAGE; yields (id, pid, unix time just before `docker run`); removed afterwards."""
    t0 = time.time()
    cid = docker("run", "-d", "--name", name, *args, IMAGE)
    try:
        pid = int(inspect(cid, "{{.State.Pid}}"))
        assert pid > 0, logs(cid)
        yield cid, pid, t0
    finally:
        docker("rm", "-f", cid, check=False)


# ---- one hardened container -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, int]]:
    with container(*HARDENED, name="qs-hardened") as (cid, pid, t0):
        ready_at = wait_ready(pid, 60.0)  # the limit is test_ready_within_10s's; the other checks go on regardless
        assert ready_at is not None, f"/health/ready not 200 within 60 s:\n{logs(cid)}"
        record(container_to_ready_s=round(ready_at - t0, 2))
        yield cid, pid


def test_ready_within_10s(served: tuple[str, int]) -> None:
    """`docker run` to /health/ready = 200 (bundled model loaded and warmed) in at most 10 s."""
    assert FIGURES["container_to_ready_s"] <= 10.0, f"ready after {FIGURES['container_to_ready_s']} s:\n{logs(served[0])}"


@pytest.fixture(scope="module")
def host_server() -> Iterator[int]:
    """The project's own server on this host (CI venv, same backend and bundled model), 127.0.0.1 only."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKSTEP_")}
    env.update(QUICKSTEP_BACKEND="onnxruntime", QUICKSTEP_DEVICE="cpu", GRADIO_ANALYTICS_ENABLED="False",
               ORT_DISABLE_TELEMETRY="1")
    proc = subprocess.Popen([str(VENV_BIN / "quickstep-serve"), "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2).status == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the host server did not get ready in 60 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def test_generate_equals_host(served: tuple[str, int], host_server: int) -> None:
    """/v1/generate in the container returns a PNG byte-equal to the host server's for the same request
    (same pinned onnxruntime, numpy and Pillow, same ONNX graph from the wheel's package data)."""
    body = json.dumps(REQUEST)
    r = in_netns(served[1], "post", str(PORT), "/v1/generate", body, "image/png")
    assert r.returncode == 0, r.stdout[:500]
    from_container = r.stdout
    req = urllib.request.Request(f"http://127.0.0.1:{host_server}/v1/generate", data=body.encode(),
                                 headers={"Content-Type": "application/json", "Accept": "image/png"})
    from_host = urllib.request.urlopen(req, timeout=60).read()
    a, b = (np.asarray(Image.open(io.BytesIO(x))) for x in (from_container, from_host))
    assert a.shape == b.shape and a.size > 0 and a.shape[0] % REQUEST["scale"] == 0, (a.shape, b.shape)
    assert np.array_equal(a, b), f"pixels differ: {int((a != b).sum())} of {a.size}"
    assert from_container == from_host, "same pixels but different PNG bytes (Pillow/zlib differ)"
    # and a JSON response decodes to the same image too
    r = in_netns(served[1], "post", str(PORT), "/v1/generate", body, "application/json")
    out = json.loads(r.stdout)
    assert base64.b64decode(out["images"][0]["b64"]) == from_host


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())


def test_runs_as_non_root(served: tuple[str, int]) -> None:
    cid, pid = served
    status = proc_status(pid)
    assert status["Uid"].split() == [str(UID)] * 4 and status["Gid"].split() == [str(UID)] * 4, status["Uid"]
    # every process in the container (its pids cgroup)
    procs = container_pids(pid)
    assert pid in procs
    assert {proc_status(p)["Uid"].split()[0] for p in procs} == {str(UID)}


def cgroup_dir(pid: int, controller: str) -> Path:
    """The cgroup v1 directory of PID for CONTROLLER (this machine: cgroup v1)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup", controllers, path.lstrip("/"))
    raise AssertionError(f"no {controller} cgroup for {pid}")


def container_pids(pid: int) -> list[int]:
    return [int(p) for p in (cgroup_dir(pid, "pids") / "cgroup.procs").read_text().split()]


def test_hardening(served: tuple[str, int]) -> None:
    """Read-only root, no capabilities, no_new_privs, memory/CPU/pids limits, seen from the kernel's side."""
    cid, pid = served
    status = proc_status(pid)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap].strip(), 16) == 0, f"{cap} = {status[cap].strip()}"
    assert status["NoNewPrivs"].strip() == "1"
    assert inspect(cid, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    r = subprocess.run([DOCKER, "exec", cid, "python", "-c", "open('/opt/venv/x', 'w')"], capture_output=True, text=True)
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    # ... while the tmpfs the server needs are writable
    docker("exec", cid, "python", "-c", "open('/tmp/x', 'w'); open('/home/quickstep/x', 'w')")
    assert int((cgroup_dir(pid, "memory") / "memory.limit_in_bytes").read_text()) == 1 << 30
    cpu = cgroup_dir(pid, "cpu")
    quota, period = (int((cpu / f).read_text()) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    assert quota / period == 1.0
    assert (cgroup_dir(pid, "pids") / "pids.max").read_text().strip() == "256"
    rss_mb = int(status["VmRSS"].split()[0]) / 1024
    record(serve_rss_mb=round(rss_mb))
    assert rss_mb < 1024 * 0.8, "the server uses most of its memory limit"


def test_pip_check() -> None:
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "pip", IMAGE, "check")
    assert out == "No broken requirements found.", out


def test_image_metadata() -> None:
    """The licence the labels name ships in the image; telemetry is off; non-root user."""
    labels = json.loads(inspect(IMAGE, "{{json .Config.Labels}}"))
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    env = dict(e.split("=", 1) for e in json.loads(inspect(IMAGE, "{{json .Config.Env}}")))
    assert env["ORT_DISABLE_TELEMETRY"] == "1" and env["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert inspect(IMAGE, "{{.Config.User}}") == f"{UID}:{UID}"
    text = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c",
                  "cat /usr/share/doc/quickstep/LICENSE")
    assert text == (REPO / "LICENSE").read_text().strip()
    record(serve_image_mb=round(int(inspect(IMAGE, "{{.Size}}")) / 1e6))


def test_healthcheck_turns_healthy(served: tuple[str, int]) -> None:
    """The image's own HEALTHCHECK (interval 10 s) reports healthy."""
    cid, _ = served
    deadline = time.monotonic() + 30
    while (state := inspect(cid, "{{.State.Health.Status}}")) != "healthy" and time.monotonic() < deadline:
        assert state in ("starting", "healthy"), inspect(cid, "{{json .State.Health}}")
        time.sleep(0.5)
    assert state == "healthy", inspect(cid, "{{json .State.Health}}")
    assert inspect(cid, "{{.State.Health.FailingStreak}}") == "0"


# ---- shutdown under load --------------------------------------------------------------------------------

def test_sigterm_under_load_drains() -> None:
    """SIGTERM (docker stop) while 8 clients keep POSTing, one connection per request: every request in flight
    at SIGTERM completes with 200, no request gets a 5xx or a truncated answer, and the container exits 0
    well within the grace period. Requests *started after* SIGTERM may find nothing listening: refused, or
    reset when the kernel drops the connections still waiting in the closed listening socket's backlog
    (the application never saw them; a balancer retries them, nginx.conf `proxy_next_upstream error`).
    Those are counted (sigterm_after_refused / sigterm_after_reset), and allowed only after SIGTERM."""
    with container(*HARDENED, "--stop-timeout", str(GRACE_S), name="qs-sigterm") as (cid, pid, _):
        assert wait_ready(pid, 60.0) is not None, logs(cid)
        body = json.dumps({"n": 8, "steps": 2, "seed": 1, "class_label": 3})
        load = subprocess.Popen(["nsenter", "-t", str(pid), "-n", sys.executable, str(PROBE), "load", str(PORT),
                                 body, "8", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert load.stdout is not None
        assert load.stdout.readline().strip() == "started"
        time.sleep(1.0)  # full load
        t_term = time.time()
        docker("stop", "-t", str(GRACE_S), cid, timeout=GRACE_S + 30)
        stop_s = time.time() - t_term
        out, err = load.communicate(timeout=90)
        results = json.loads(out)
        exit_code = inspect(cid, "{{.State.ExitCode}}")
        output = logs(cid)
    in_flight = [r for r in results if r[0] < t_term < r[1]]
    before = [r for r in results if r[1] <= t_term]
    after = [r for r in results if r[0] >= t_term]
    reset = "error: ConnectionResetError"
    record(sigterm_stop_s=round(stop_s, 2), sigterm_in_flight=len(in_flight), sigterm_completed_before=len(before),
           sigterm_after_ok=sum(r[2] == 200 for r in after), sigterm_after_refused=sum(r[2] == "refused" for r in after),
           sigterm_after_reset=sum(str(r[2]).startswith(reset) for r in after))
    assert all(r[2] == 200 for r in before), [r for r in before if r[2] != 200][:5]
    assert len(in_flight) >= 4, f"only {len(in_flight)} requests were in flight at SIGTERM (the test did not test)"
    assert all(r[2] == 200 for r in in_flight), f"dropped in flight: {[r for r in in_flight if r[2] != 200][:5]}"
    bad_after = [r for r in after if r[2] != 200 and r[2] != "refused" and not str(r[2]).startswith(reset)]
    assert not bad_after, f"5xx or broken answers after SIGTERM: {bad_after[:5]}"
    assert exit_code == "0", f"exit code {exit_code}:\n{output}"
    assert stop_s < GRACE_S, f"the container needed {stop_s:.1f} s (grace {GRACE_S} s): it was killed"


# ---- compose: 2 replicas behind nginx, Prometheus ---------------------------------------------------------

def compose(*args: str, env: dict[str, str], timeout: float = 180) -> str:
    cmd = [DOCKER, "compose", "-p", "qstest", "-f", str(DOCKER_DIR / "compose.yaml"), "-f", str(OVERRIDE), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr[-3000:]}"
    return r.stdout.strip()


@pytest.fixture(scope="module")
def stack() -> Iterator[dict]:
    http_port, prom_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKSTEP_")}
    env.update(QUICKSTEP_REPLICAS="2", QUICKSTEP_HTTP_PORT=str(http_port), QUICKSTEP_PROMETHEUS_PORT=str(prom_port),
               QUICKSTEP_INTRA_OP_THREADS="1")
    t0 = time.monotonic()
    try:
        compose("up", "-d", "--no-build", "--wait", env=env)
        record(compose_up_healthy_s=round(time.monotonic() - t0, 1))
        ids = compose("ps", "-q", "serve", env=env).split()
        pids = [int(inspect(c, "{{.State.Pid}}")) for c in ids]
        ips = [inspect(c, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}") for c in ids]
        yield {"env": env, "http": http_port, "prom": prom_port, "pids": pids, "ips": ips, "ids": ids}
    finally:
        subprocess.run([DOCKER, "compose", "-p", "qstest", "-f", str(DOCKER_DIR / "compose.yaml"), "-f", str(OVERRIDE),
                        "down", "-v", "--remove-orphans", "-t", "5"], env=env, capture_output=True, timeout=120)


def bench(url: str, concurrency: int, duration: float, out: Path, n: int = 1) -> dict:
    r = subprocess.run([str(VENV_BIN / "quickstep"), "bench", "--url", url, "--concurrency", str(concurrency),
                        "--duration", str(duration), "-n", str(n), "--out", str(out)],
                       capture_output=True, text=True, timeout=duration + 120)
    assert r.returncode == 0, r.stdout + r.stderr
    (level,) = json.loads(out.read_text())["levels"]
    return level


def test_compose_balancer_load(stack: dict) -> None:
    """`quickstep bench` for 30 s through nginx on 127.0.0.1: no failures; both replicas served a fair share."""
    assert len(stack["pids"]) == 2
    before = [generated(p) for p in stack["pids"]]
    level = bench(f"http://127.0.0.1:{stack['http']}", 8, 30.0, WORK / "bench-lb.json", n=4)
    after = [generated(p) for p in stack["pids"]]
    served = [a - b for a, b in zip(after, before, strict=True)]
    record(lb_rps=round(level["throughput_rps"], 1), lb_img_per_s=round(level["images_per_s"], 1),
           lb_requests=level["sent"], lb_replica_requests=served, lb_p50_ms=level["latency_ms"]["p50"])
    assert level["failed"] == 0 and not level["failed_by_status"], level["failed_by_status"]
    assert level["succeeded"] >= 30, level
    assert all(s > 0.25 * sum(served) for s in served), f"one replica took (almost) no traffic: {served}"
    assert sum(served) >= level["succeeded"], (served, level["succeeded"])


def prometheus(port: int, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read())


def test_prometheus_scrapes_each_replica(stack: dict) -> None:
    expected = {f"{ip}:{PORT}" for ip in stack["ips"]}
    deadline = time.monotonic() + 40  # scrape_interval 15 s
    while True:
        targets = prometheus(stack["prom"], "/api/v1/targets")["data"]["activeTargets"]
        up = {t["labels"]["instance"] for t in targets if t["labels"]["job"] == "quickstep" and t["health"] == "up"}
        q = prometheus(stack["prom"], "/api/v1/query?query=sum+by+(instance)+(quickstep_requests_total"
                                      "%7Broute%3D%22%2Fv1%2Fgenerate%22%7D)")
        counted = {r["metric"]["instance"] for r in q["data"]["result"] if float(r["value"][1]) > 0}
        if (up == expected and counted == expected) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert up == expected, f"targets up {up}, replicas {expected}"
    assert counted == expected, f"replicas with scraped /v1/generate counts: {counted}"


@pytest.mark.skipif(os.environ.get("QUICKSTEP_DOCKER_COMPARE") != "1", reason="benchmark: QUICKSTEP_DOCKER_COMPARE=1")
def test_balancer_vs_bare_processes(stack: dict, tmp_path: Path) -> None:
    """Benchmark (figures only): the compose stack (2 replicas + nginx) against two bare `quickstep-serve`
    processes on the same cores with the same settings. The same load generator both ways (two `quickstep
    bench` processes at concurrency 4, 4 images a request: both at the balancer, or one at each bare
    process), in alternating rounds so that the other load on the machine drifts into both alike."""
    rounds = int(os.environ.get("QUICKSTEP_DOCKER_COMPARE_ROUNDS", "3"))
    duration = float(os.environ.get("QUICKSTEP_DOCKER_COMPARE_S", "10"))
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICKSTEP_")}
    env.update(QUICKSTEP_BACKEND="onnxruntime", QUICKSTEP_DEVICE="cpu", QUICKSTEP_INTRA_OP_THREADS="1",
               QUICKSTEP_UI="false", ORT_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False")
    procs = [subprocess.Popen([str(VENV_BIN / "quickstep-serve"), "--host", "127.0.0.1", "--port", str(p)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]

    def pair(urls: list[str], tag: str) -> float:
        levels: list[dict] = [{}, {}]

        def run(i: int) -> None:
            levels[i] = bench(urls[i], 4, duration, tmp_path / f"{tag}-{i}.json", n=4)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(lv and lv["failed"] == 0 for lv in levels), levels
        return sum(lv["throughput_rps"] for lv in levels)

    try:
        for p in ports:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"http://127.0.0.1:{p}/health/ready", timeout=2).status == 200:
                        break
                assert time.monotonic() < deadline, "a bare server was not ready in 120 s"
                time.sleep(0.2)
        lb_url = f"http://127.0.0.1:{stack['http']}"
        lb, bare = [], []
        for r in range(rounds):
            lb.append(pair([lb_url, lb_url], f"lb{r}"))
            bare.append(pair([f"http://127.0.0.1:{p}" for p in ports], f"bare{r}"))
    finally:
        for pr in procs:
            pr.terminate()
            pr.wait(30)
    ratios = [a / b for a, b in zip(lb, bare, strict=True)]
    record(compare_lb_rps=[round(x, 1) for x in lb], compare_bare_rps=[round(x, 1) for x in bare],
           compare_lb_over_bare=[round(x, 3) for x in ratios])


def server_finished_at(container: str) -> float:
    """When uvicorn logged "Finished server process" (docker logs -t), as a unix time."""
    r = subprocess.run([DOCKER, "logs", "-t", container], capture_output=True, text=True, timeout=60)
    (line,) = [x for x in (r.stdout + r.stderr).splitlines() if "Finished server process" in x]
    return parse_time(line.split()[0])


def parse_time(stamp: str) -> float:
    """RFC 3339 UTC with nanoseconds (Docker's timestamps) -> unix time."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", stamp)
    assert m, stamp
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + float(f"0.{m.group(2) or 0}")


def test_compose_stop_fast(stack: dict) -> None:
    """`docker compose stop`: every container exits 0, and a replica's process ends promptly once its server
    has stopped (with onnxruntime's telemetry on, it lingered 3-8 s on a network with no way out): the host
    watches each replica's PID 1 vanish from /proc. The command's wall time (the target is 2 s; it adds the
    daemon's own work) is recorded as compose_stop_s."""
    names = compose("ps", "-q", env=stack["env"]).split()
    gone: dict[int, float] = {}

    def watch(pid: int) -> None:
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.005)
        gone[pid] = time.time()

    watchers = [threading.Thread(target=watch, args=(pid,), daemon=True) for pid in stack["pids"]]
    for w in watchers:
        w.start()
    t0 = time.monotonic()
    compose("stop", env=stack["env"])
    stop_s = time.monotonic() - t0
    for w in watchers:
        w.join(30)
    codes = {inspect(c, "{{.Name}}").lstrip("/"): inspect(c, "{{.State.ExitCode}}") for c in names}
    linger = {inspect(c, "{{.Name}}").lstrip("/"): round(gone[pid] - server_finished_at(c), 2)
              for c, pid in zip(stack["ids"], stack["pids"], strict=True)}
    record(compose_stop_s=round(stop_s, 2), replica_exit_after_server_stop_s=linger)
    assert len(names) == 4 and set(codes.values()) == {"0"}, codes
    # 2.5 s: the telemetry defect lingered 3-8 s; a healthy exit took 0.05-0.08 s on the host and 0.9-2.2 s
    # in a container on this 2-core machine at load average 10-12 (CPU-starved interpreter teardown)
    assert max(linger.values()) <= 2.5, f"replicas lingered {linger} s after their server stopped"


