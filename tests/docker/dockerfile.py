"""A small Dockerfile reader for the tests: stages, instructions, ENV, exec-form ENTRYPOINT/CMD, COPY.

Only what docker/Dockerfile* use is supported (line continuations, comments, `KEY=value` ENV pairs,
JSON exec form); anything else raises, so a Dockerfile change the tests cannot read fails loudly.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
# keyed by file name (a key like "gpu" would become a pytest keyword and trigger the `gpu` marker's skip)
DOCKERFILES = {name: DOCKER / name for name in ("Dockerfile", "Dockerfile.gpu", "Dockerfile.train")}


@dataclass(frozen=True)
class Instruction:
    """One instruction: upper-case keyword, raw argument text, 1-based line of its first line."""

    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    """One build stage (FROM ... [AS name]) and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """Every ENV of the stage, later ones overriding earlier ones (`$VAR` left unexpanded)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            out.update(parse_env(ins.args))
        return out

    def exec_form(self, keyword: str) -> list[str]:
        """The last ENTRYPOINT / CMD in JSON exec form ([] when the stage has none)."""
        found = self.all(keyword)
        if not found:
            return []
        value = json.loads(found[-1].args)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{keyword} on line {found[-1].line} is not an exec-form JSON list of strings")
        return value

    def copies(self) -> list[tuple[list[str], str, list[str]]]:
        """(sources, destination, flags) of every COPY."""
        out = []
        for ins in self.all("COPY"):
            parts = shlex.split(ins.args)
            flags = [p for p in parts if p.startswith("--")]
            rest = [p for p in parts if not p.startswith("--")]
            out.append((rest[:-1], rest[-1], flags))
        return out


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and drop comment lines; return (first line number, text)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        out.append((start, " ".join(b for b in buf if b)))
        buf = []
    if buf:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return out


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile (global ARGs before the first FROM are dropped)."""
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text()):
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            if not m:
                raise ValueError(f"{path.name}:{line}: cannot read FROM {args!r}")
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), line))
    if not stages:
        raise ValueError(f"{path} has no FROM")
    return stages


def parse_env(args: str) -> dict[str, str]:
    """`ENV K1=v1 K2="v 2"` -> dict (the legacy `ENV K v` form is refused)."""
    out: dict[str, str] = {}
    for token in shlex.split(args):
        key, eq, value = token.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"ENV {args!r}: use KEY=value pairs")
        out[key] = value
    return out


def global_args(path: Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM."""
    out: dict[str, str] = {}
    for _, text in logical_lines(path.read_text()):
        keyword, _, args = text.partition(" ")
        if keyword.upper() == "FROM":
            break
        if keyword.upper() == "ARG":
            key, _, value = args.strip().partition("=")
            out[key] = value
    return out


def final_stage(path: Path) -> Stage:
    return parse(path)[-1]


def healthcheck_argv(stage: Stage) -> list[str]:
    """The exec-form command of the stage's HEALTHCHECK (`HEALTHCHECK [options] CMD [...]`)."""
    (check,) = stage.all("HEALTHCHECK")
    _, sep, cmd = check.args.partition("CMD ")
    if not sep:
        raise ValueError(f"HEALTHCHECK on line {check.line} has no CMD")
    value = json.loads(cmd)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"HEALTHCHECK on line {check.line} is not in exec form")
    return value


def command_line(stage: Stage) -> list[str]:
    """What `docker run IMAGE` executes: ENTRYPOINT + CMD (exec form)."""
    return stage.exec_form("ENTRYPOINT") + stage.exec_form("CMD")
