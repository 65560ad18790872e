"""FID Inception-v3 loading from local files (safetensors / weights-only state dict); no download."""

from __future__ import annotations

import pytest
import torch
from quickstep.train.eval.inception import FEATURE_DIM, FIDInceptionV3, inception_features, load_inception
from safetensors.torch import save_file


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_inception(tmp_path / "missing.pth")
    bad = tmp_path / "w.bin"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="allowed: .safetensors, .pt, .pth"):
        load_inception(bad)
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        load_inception(other)


@pytest.mark.slow
def test_round_trip_through_both_formats_and_features(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = FIDInceptionV3().eval()
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # like the 2015 file
    save_file(sd, str(tmp_path / "inc.safetensors"))
    torch.save(sd, tmp_path / "inc.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = net(x)
    for name in ("inc.safetensors", "inc.pth"):
        f = inception_features(load_inception(tmp_path / name), x)
        assert f.shape == (2, FEATURE_DIM)
        torch.testing.assert_close(f, ref)
    grey = inception_features(load_inception(tmp_path / "inc.pth"), x[:, :1])
    assert grey.shape == (2, FEATURE_DIM)
