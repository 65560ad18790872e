"""`quickstep generate|models|health` against a real server: the files it promises, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from quickstep.client.cli import main, make_grid

from tests.helpers import free_port


def test_generate_writes_images_sidecars_and_grid(real_server, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "-n", "5", "--steps", "2", "--seed", "0", "--url", real_server.url, "-o", str(out),
               "--grid", str(tmp_path / "grid.png")])
    assert rc == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{k:03d}.png" for k in range(5)]
    for k, p in enumerate(pngs):
        meta = json.loads(p.with_suffix(".json").read_text())
        assert (meta["seed"], meta["index"], meta["steps"], meta["model"]) == (0, k, 2, "tiny-consistency")
        assert Image.open(p).size == (8, 8)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # 3 columns x 2 rows, 2 px padding
    # the grid holds image 4 at row 1, column 1
    assert np.array_equal(np.asarray(grid)[12:20, 12:20], np.asarray(Image.open(pngs[4])))
    assert "5 image(s) from tiny-consistency (steps=2, seed=0" in capsys.readouterr().out


def test_models_and_health_commands(real_server, capsys, monkeypatch):
    monkeypatch.setenv("QUICKSTEP_URL", real_server.url)
    assert main(["models"]) == 0
    assert "tiny-consistency" in capsys.readouterr().out
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image_shape"] == [1, 8, 8]
    assert main(["health"]) == 0
    assert "ready=yes" in capsys.readouterr().out


def test_server_errors_are_one_line_with_code_and_message(real_server, tmp_path, capsys):
    rc = main(["generate", "-n", "100", "--url", real_server.url, "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("quickstep: error: HTTP 422 invalid_request: n:") and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    rc = main(["generate", "--model", "nope", "--url", real_server.url, "-o", str(tmp_path / "x")])
    assert rc == 1 and "HTTP 404 model_not_found" in capsys.readouterr().err


def test_console_script_unreachable_server_exits_nonzero_without_traceback(tmp_path):
    script = Path(sys.executable).parent / "quickstep"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "quickstep.client.cli"]
    r = subprocess.run([*cmd, "health", "--url", f"http://127.0.0.1:{free_port()}"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("quickstep: error: connection_failed: cannot reach http://127.0.0.1:")


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["generate", "--format", "gif", "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("quickstep: error: invalid_request: format:") and "'png', 'jpeg' or 'webp'" in err
    assert main(["generate", "--url", "ftp://x"]) == 1
    assert "url must start with http://" in capsys.readouterr().err
    assert main(["generate", "--no-such-flag"]) == 2


def test_make_grid_layout():
    ims = [Image.new("L", (2, 3), v) for v in (10, 20, 30)]
    g = np.asarray(make_grid(ims, cols=2, pad=1))
    assert g.shape == (2 * 3 + 3, 2 * 2 + 3)
    assert g[1, 1] == 10 and g[1, 4] == 20 and g[5, 1] == 30 and g[5, 4] == 0 and g[0, 0] == 0
