"""[issue 23] The README's "Your own images" snippet works as written (`fit` gets `--steps 2`, batch 8 and 4 samples),
on a tiny generated image folder with class sub-folders (mixed sizes: --resolution and --crop) and an EDM zip."""

from __future__ import annotations

import json
import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
from quickstep.train.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- data-snippet -->\s*```bash\n(.*?)```\s*<!-- /data-snippet -->", text, re.S)
    assert block, "the README lost its data snippet markers"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def test_readme_data_snippet_runs_as_written(tmp_path, monkeypatch, capsys, one_thread):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("apple", "pear"):
        (tmp_path / "my_images" / cls).mkdir(parents=True)
        for i in range(6):
            size = (40, 36) if i % 2 else (36, 36)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                tmp_path / "my_images" / cls / f"{i}.png")
    with zipfile.ZipFile(tmp_path / "my_dataset.zip", "w") as z:
        labels = []
        for i in range(8):
            name = f"00000/img{i:08d}.png"
            im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            with z.open(name, "w") as f:
                im.save(f, format="PNG")
            labels.append([name, i % 4])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    monkeypatch.chdir(tmp_path)
    for argv in snippet():
        assert argv[0] == "quickstep-train", argv
        args = argv[1:] + (["--steps", "2", "--set", "batch_size=8", "--set", "log.sample_n=4"]
                           if argv[1] == "fit" else [])
        assert main(args) == 0, (argv, capsys.readouterr().err[-2000:])
    meta = json.loads((tmp_path / "data" / "my_images" / "meta.json").read_text())
    assert meta["shape"] == [12, 3, 32, 32] and meta["class_names"] == ["apple", "pear"]
    cfg = json.loads((tmp_path / "runs" / "my_images" / "step-0000002" / "config.json").read_text())
    assert cfg["data"]["class_names"] == ["apple", "pear"] and cfg["train"]["data"]["name"] == "prepared"
    assert (tmp_path / "my_images.png").is_file()
    cfg = json.loads((tmp_path / "runs" / "my_dataset" / "step-0000002" / "config.json").read_text())
    assert cfg["data"]["num_classes"] == 4 and cfg["data"].get("class_names") is None
