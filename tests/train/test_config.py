"""The training configuration on pydantic: presets load and round-trip, choices are Literals whose errors name the
valid values, the backbone is typed per model.kind, and configs saved by older versions still read the same."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from quickstep.train.cli import main
from quickstep.train.config import (
    BACKBONES,
    CORE_BACKBONES,
    DATA_DERIVED,
    TIME_SCALE,
    ConfigError,
    TrainConfig,
    build_config,
    list_presets,
    load_preset,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_round_trips_through_json(name):
    cfg = load_preset(name)
    saved = json.loads(json.dumps(cfg.to_dict()))  # plain JSON, as checkpoints store it
    assert TrainConfig.from_dict(saved) == cfg and build_config(saved) == cfg
    assert saved["model"]["backbone"] == json.loads(json.dumps(cfg.model.backbone.model_dump()))
    assert "kind" not in saved["model"]["backbone"]  # the kind is model.kind
    assert cfg.objectives and all(dataclasses.is_dataclass(c) for c in cfg.objectives.values())


@pytest.mark.parametrize("key, bad, choices", [
    ("optim.name", "sgd", "adam, adamw, radam"),
    ("optim.fused", "yes", "auto, on, off"),
    ("amp", "fp16", "auto, bf16, none"),
    ("channels_last", "yes", "auto, on, off"),
    ("model.kind", "cnn", "mlp, unet"),
    ("data.crop", "left", "none, center"),
    ("data.split", "val", "train, test, all"),
])
def test_a_bad_choice_names_the_valid_values(key, bad, choices):
    with pytest.raises(ConfigError) as e:
        load_preset("gmm2d-plain", [f"{key}={bad}"])
    assert str(e.value) == f"{key} = {bad!r} is not valid; valid values: {choices}"


def test_device_is_a_choice_or_cuda_n():
    assert load_preset("gmm2d-plain", ["device=cuda:1"]).device == "cuda:1"
    for bad in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(ConfigError, match="valid values: auto, cpu, cuda, cuda:N"):
            load_preset("gmm2d-plain", [f"device={bad}"])


def test_the_backbone_is_the_table_of_model_kind():
    mlp, unet = load_preset("gmm2d-plain"), load_preset("digits-plain")
    assert isinstance(mlp.model.backbone, BACKBONES["mlp"]) and isinstance(unet.model.backbone, BACKBONES["unet"])
    assert unet.model.backbone.channel_mult == (1, 2) and mlp.model.backbone.hidden == 128
    with pytest.raises(ConfigError, match=r"unknown key model.backbone.model_channels .*; valid keys: hidden, depth"):
        load_preset("gmm2d-plain", ["model.backbone.model_channels=8"])
    with pytest.raises(ConfigError, match=r"unknown key model.backbone.hidden; valid keys: model_channels, "):
        load_preset("gmm2d-plain", ["model.kind=unet"])  # the MLP's keys are not a UNet's
    with pytest.raises(ConfigError, match=r"unknown key model.backbone.widht; valid keys: hidden, depth, dropout, emb_channels, time_scale$"):
        load_preset("gmm2d-plain", ["model.backbone.widht=3"])
    with pytest.raises(ConfigError, match=r"unknown key model.backbone.kind"):
        load_preset("gmm2d-plain", ['model.backbone.kind="unet"'])
    with pytest.raises(ConfigError, match=r"model.backbone.channel_mult must be an integer, got 'x'"):
        load_preset("digits-plain", ['model.backbone.channel_mult=[1, "x"]'])
    # a kind without a backbone table gets that kind's defaults
    cfg = build_config({"data": {"name": "digits"}, "model": {"kind": "unet"}, "objectives": {"diffusion": {}}})
    assert cfg.model.backbone == BACKBONES["unet"]()


def test_backbone_fields_are_the_core_configs_less_the_data_derived_ones():
    """One definition of the networks: the config tables carry exactly the core config fields the user chooses, with
    the core defaults except time_scale (the presets' 10)."""
    for kind, table in BACKBONES.items():
        core = {f.name: f.default for f in dataclasses.fields(CORE_BACKBONES[kind]) if f.init}
        fields = {k: f.default for k, f in table.model_fields.items() if k != "kind"}
        assert set(fields) == set(core) - set(DATA_DERIVED[kind]), kind
        assert {k: v for k, v in fields.items() if v != core[k]} == {"time_scale": TIME_SCALE}, kind


def test_no_preset_repeats_the_time_scale_default():
    for name in list_presets():
        assert "time_scale" not in (ROOT / "train" / "configs" / f"{name}.toml").read_text(), name
        assert load_preset(name).model.backbone.time_scale == TIME_SCALE


def test_values_are_taken_as_toml_typed_them():
    cfg = load_preset("gmm2d-plain", ["steps=1e3", "optim.lr=1", "optim.betas=[0.5, 1]"])
    assert cfg.steps == 1000 and isinstance(cfg.steps, int) and cfg.optim.lr == 1.0
    assert cfg.optim.betas == (0.5, 1.0)
    for item, needle in [("tf32=yes", "tf32 must be true or false, got 'yes'"),
                         ("steps=1.5", "steps must be an integer, got 1.5"),
                         ('steps="3"', "steps must be an integer, got '3'"),
                         ("steps=0", "steps must be >= 1, got 0"),
                         ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
                         ("optim.betas=[0.9]", "optim.betas must have 2 elements, got [0.9]"),
                         ("optim.betas=[0.9, 0.9, 0.9]", "optim.betas must have 2 elements"),
                         ("optim=3", "optim must be a table of name, fused, lr"),
                         ("data.name=3", "data.name must be a string, got 3")]:
        with pytest.raises(ConfigError) as e:
            load_preset("gmm2d-plain", [item])
        assert needle in str(e.value), (item, str(e.value))


def test_objectives_are_their_config_dataclasses():
    from quickstep.train.losses import OBJECTIVES

    cfg = load_preset("gmm2d-plain", ["objectives.cp.weight=5"])
    assert isinstance(cfg.objectives["cp"], OBJECTIVES["cp"].config_cls) and cfg.objectives["cp"].weight == 5.0
    with pytest.raises(ConfigError, match=r"unknown key objectives.cq; valid keys: " + ", ".join(sorted(OBJECTIVES))):
        load_preset("gmm2d-plain", ["objectives.cq.weight=1"])
    with pytest.raises(ConfigError, match=r"unknown key objectives.cp.wieght \(did you mean 'weight'\?\); valid keys"):
        load_preset("gmm2d-plain", ["objectives.cp.wieght=1"])
    with pytest.raises(ConfigError, match=r"objectives.cp.chain_steps must be an integer, got 'x'"):
        load_preset("gmm2d-plain", ["objectives.cp.chain_steps=x"])
    with pytest.raises(ConfigError, match=r"objectives.scd: tangent_norm must be one of"):  # the dataclass's check
        load_preset("gmm2d-scd", ['objectives.scd.tangent_norm="linf"'])
    with pytest.raises(ConfigError, match="no objective configured; add one of: cd, cp"):
        build_config({})


def test_the_config_is_frozen():
    cfg = load_preset("gmm2d-plain")
    with pytest.raises(ValueError, match="frozen"):
        cfg.steps = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        cfg.optim.lr = 3.0  # type: ignore[misc]


def test_a_config_saved_by_an_older_version_reads_as_it_meant():
    """Before the typed backbone a checkpoint saved only the backbone keys its preset set (the digits-scd bundle
    shipped until 2026-12-02, whose config.json is kept here, has no time_scale): a missing key meant the core
    default, time_scale 1000."""
    saved = json.loads((ROOT / "tests" / "train" / "data" / "digits-scd-config-2026-12-01.json").read_text())["train"]
    assert "time_scale" not in saved["model"]["backbone"]
    cfg = TrainConfig.from_dict(saved)
    assert cfg.model.backbone.time_scale == 1000.0 and cfg.model.backbone.model_channels == 32
    assert cfg.objectives["scd"].tangent_norm == "l2" and cfg.optim.name == "radam" and cfg.steps == 1200
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_cli_reports_a_bad_value_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--preset", "gmm2d-plain", "--set", "amp=fp16", "--out", "x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "quickstep-train: error: amp = 'fp16' is not valid; valid values: auto, bf16, none"
