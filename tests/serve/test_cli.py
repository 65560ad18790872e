"""quickstep-serve: flags over QUICKSTEP_* environment, clear exits for missing/corrupt bundles."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import httpx
import pytest
from quickstep.serve import bundle as bundle_mod
from quickstep.serve import cli
from quickstep.serve.settings import ServeSettings

from tests.helpers import free_port


def test_settings_from_environment(monkeypatch, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# comment\nk1\n\nk2\n")
    monkeypatch.setenv("QUICKSTEP_MAX_BATCH", "7")
    monkeypatch.setenv("QUICKSTEP_BUNDLE", "/a,/b")
    monkeypatch.setenv("QUICKSTEP_API_KEYS", "k0")
    monkeypatch.setenv("QUICKSTEP_API_KEY_FILE", str(keyfile))
    monkeypatch.setenv("QUICKSTEP_CORS_ORIGINS", '["http://x"]')
    s = ServeSettings()
    assert s.max_batch == 7 and [str(p) for p in s.bundle] == ["/a", "/b"] and s.cors_origins == ["http://x"]
    assert s.resolved_api_keys() == ["k0", "k1", "k2"] and "k0" not in repr(s)
    assert ServeSettings(max_batch=3).max_batch == 3  # explicit (CLI) values win


def test_no_bundle_and_no_default_exits_clearly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bundle_mod, "BUNDLED_DIR", tmp_path / "none")
    assert cli.main(["--no-ui"]) == 2
    err = capsys.readouterr().err
    assert "bundled default model is not installed" in err and "--bundle" in err


def test_bad_inputs_exit_2(tmp_path, capsys, cond_bundle_dir):
    assert cli.main(["--bundle", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--bundle", str(cond_bundle_dir), "--max-batch", "0"]) == 2
    assert "max_batch" in capsys.readouterr().err
    assert cli.main(["--bundle", str(cond_bundle_dir), "--api-key-file", str(tmp_path / "nokeys")]) == 2
    assert "api_key_file" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(cond_bundle_dir, bad)
    (bad / "model.safetensors").write_bytes(b"x")
    assert cli.main(["--bundle", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_serves_and_shuts_down(cond_bundle_dir):
    """The installed entry point, configured by environment, serves and exits cleanly on SIGINT."""
    import os
    import signal

    port = free_port()
    env = {**os.environ, "QUICKSTEP_PORT": str(port), "QUICKSTEP_UI": "false", "QUICKSTEP_BUNDLE": str(cond_bundle_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "quickstep.serve.cli", "--log-level", "warning"], env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"seed": 1}).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_unusable_backend_fails_before_listening(cond_bundle_dir, capsys):
    assert cli.main(["--bundle", str(cond_bundle_dir), "--backend", "aoti", "--no-ui"]) == 2
    assert "AOTInductor" in capsys.readouterr().err
    assert cli.main(["--bundle", str(cond_bundle_dir), "--backend", "tensorrt", "--no-ui"]) == 2
    assert "TensorRT" in capsys.readouterr().err
