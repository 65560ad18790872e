"""README "Use it from the clients you have": its openai, tritonclient and curl snippets run as written against a
real server on 127.0.0.1 serving the bundled model (only the address localhost:8000 is swapped for a free port)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from quickstep.serve.bundle import bundled_default

from .conftest import serve

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks(lang: str) -> list[str]:
    text = README.read_text()
    start = text.index("## Use it from the clients you have")
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def server():
    with serve(bundle=[bundled_default()]) as s:
        yield s


def run_python(code: str, server, cwd: Path) -> str:
    code = code.replace("localhost:8000", server.url.removeprefix("http://"))
    script = cwd / "snippet.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_readme_has_the_three_snippets():
    py = section_blocks("python")
    assert len(py) == 2 and "from openai import OpenAI" in py[0] and "tritonclient.http" in py[1]
    assert len(section_blocks("bash")) == 1


def test_readme_openai_snippet(server, tmp_path):
    run_python(section_blocks("python")[0], server, tmp_path)
    files = sorted(tmp_path.glob("seven-*.png"))
    assert len(files) == 4 and all(Image.open(f).size == (64, 64) for f in files)


def test_readme_tritonclient_snippet(server, tmp_path):
    assert run_python(section_blocks("python")[1], server, tmp_path).strip() == "(4, 16, 16, 1) uint8"


def test_readme_curl_snippet(server, tmp_path):
    script = section_blocks("bash")[0].replace("localhost:8000", server.url.removeprefix("http://"))
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, (r.stdout, r.stderr)
    assert lines[0].startswith('{"created":') and '"b64_json":"' in lines[0]
    assert lines[1].startswith('{"model_name":"digits-direct-cm"')
