"""`make device-prep`: the wheelhouse .whl/ that travels to the device (CPython 3.12, manylinux x86_64, no package
index there) with what its image lacks for serving: fastapi, uvicorn, pydantic(-settings) and their requirements,
at the versions installed in this .venv (the ones the tests ran with).  Then checks that the tree that travels
(tracked + untracked-not-ignored files + .whl) stays well within the device tool's 64 MiB.

    .venv/bin/python scripts/device_prep.py [--dest .whl] [--limit-mib 48]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic-settings", "python-multipart")
# the device image has these (KINDS.md's package list) and nothing here needs another version of them
ON_DEVICE = {"numpy", "torch", "idna", "click", "h11", "zipp", "packaging"}
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """name -> installed version for the roots and their (non-extra, Python 3.12 Linux) requirements."""
    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in out or name in ON_DEVICE:
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in this environment; run `make install-dev` first") from None
        for spec in requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(TARGET_ENV):
                todo.append(req.name)
    return out


def traveling_bytes(dest: Path) -> int:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    total = sum(Path(f.decode()).stat().st_size for f in files if f and Path(f.decode()).is_file())
    return total + sum(p.stat().st_size for p in dest.glob("*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"))
    ap.add_argument("--limit-mib", type=float, default=48.0, help="fail above this traveling size (tool limit 64)")
    a = ap.parse_args()
    pins = closure(ROOTS)
    a.dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *sum((["--platform", p] for p in PLATFORMS), []), "-d", str(a.dest),
           *(f"{n}=={v}" for n, v in sorted(pins.items()))]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    keep = {(norm(n), v) for n, v in pins.items()}
    for whl in a.dest.glob("*.whl"):  # one version of each: two stop the install on the device
        name, ver = whl.name.split("-")[:2]
        if (norm(name), ver) not in keep:
            print(f"removing stale {whl.name}")
            whl.unlink()
    wheels = sorted(a.dest.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels)
    total = traveling_bytes(a.dest)
    print(f"{len(wheels)} wheels, {size / 2**20:.2f} MiB in {a.dest}/; the traveling tree with them: "
          f"{total / 2**20:.2f} MiB (device tool limit 64 MiB, this check {a.limit_mib:g} MiB)")
    for w in wheels:
        print(f"  {w.name} ({w.stat().st_size / 1024:.0f} KiB)")
    if total > a.limit_mib * 2**20:
        raise SystemExit(f"the traveling tree is {total / 2**20:.1f} MiB > {a.limit_mib:g} MiB: ignore or remove "
                         "large untracked files before the device run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
