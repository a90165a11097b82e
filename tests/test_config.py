"""Configs load, validate with errors naming the key, take --set overrides and round-trip through YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import REPO

from cman.config import ConfigError, load_config

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("name", ["default", "minimal", "demo"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_default_matches_the_seed_defaults():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg.model.text.pretrained == "roberta-base"
    assert cfg.model.audio.pretrained == "MIT/ast-finetuned-audioset-10-10-0.4593"
    assert cfg.model.image.pretrained == "google/vit-base-patch16-224"
    assert (cfg.model.embedding_dim, cfg.model.dropout) == (512, 0.3)
    assert (cfg.peft.rank, cfg.peft.alpha, cfg.peft.dropout) == (8, 16, 0.2)
    assert (cfg.model.fusion.layers, cfg.model.fusion.heads, cfg.model.fusion.ffn) == (6, 8, 2048)
    assert (cfg.training.epochs, cfg.training.learning_rate, cfg.training.weight_decay) == (70, 5e-5, 0.01)
    assert cfg.training.batch_size == 32 and cfg.loss.margin == 0.2


def test_overrides_reach_any_key_and_parse_yaml_values():
    cfg = load_config(
        CONFIGS / "demo.yaml",
        [
            "peft.rank=16",
            "training.learning_rate=3e-4",
            "data.root=/x",
            "model.image.init.image_size=32",
            "tune.space.rank=[4, 8]",
        ],
    )
    assert cfg.peft.rank == 16 and cfg.training.learning_rate == 3e-4 and cfg.data.root == "/x"
    assert cfg.model.image.init["image_size"] == 32 and cfg.tune.space.rank == [4, 8]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft.rnak=4"], r"peft\.rnak: unknown key"),
        (["peft.rank=0"], r"peft\.rank: Input should be greater than or equal to 1"),
        (["training.epochs=many"], r"training\.epochs: Input should be a valid integer"),
        (["model.embedding_dim=510"], r"embedding_dim 510 is not divisible by fusion.heads 4"),
        (["model.fusion.width=130"], r"model\.fusion: width 130 is not divisible by heads 4"),
        (["loss.type=triplet"], r"loss\.type: Input should be 'max_margin' or 'infonce'"),
        (["tune.space.rank=[]"], r"tune\.space\.rank: rank choices must be a non-empty list"),
        (["tune.space.learning_rate=[1e-3, 1e-5]"], r"tune\.space\.learning_rate: range \[0\.001, 1e-05\]"),
        (["model.text.init=null", "model.text.pretrained=null"], r"model\.text: set exactly one of"),
        (["training"], r"expected KEY=VALUE"),
    ],
)
def test_bad_values_are_one_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", overrides)


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty_model = tmp_path / "empty.yaml"
    empty_model.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="configure at least one of model.text"):
        load_config(empty_model)


def test_flat_view_for_trackers():
    flat = load_config(CONFIGS / "demo.yaml").flat()
    assert flat["peft.rank"] == 8 and flat["model.fusion.layers"] == 2
    assert all(isinstance(v, str | int | float | bool | type(None)) for v in flat.values()), flat


def test_config_show_round_trips_merges_in_order_and_schema_lists_every_key(tmp_path: Path, capsys) -> None:
    """`cman config show` prints the resolved config (defaults included) that loads back to the same config;
    several --config files merge in order; `cman config schema` is the JSON schema; unknown keys get a suggestion."""
    import json

    from cman.cli import main
    from cman.config import ConfigError

    extra = tmp_path / "extra.yaml"
    extra.write_text("training:\n  epochs: 7\nmodel:\n  fusion:\n    layers: 1\n")
    assert main(["config", "show", "--config", "demo", "--config", str(extra), "--set", "training.batch_size=5"]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    config = load_config(shown)
    assert (config.training.epochs, config.training.batch_size, config.model.fusion.layers) == (7, 5, 1)
    demo = load_config(REPO / "configs" / "demo.yaml", {"training.epochs": 7, "training.batch_size": 5})
    assert config.model.text == demo.model.text and config.loss == demo.loss  # the rest is demo.yaml's
    assert "warmup_ratio" in shown.read_text()  # defaults included, not only what the files set
    assert main(["config", "show", "--config", str(shown)]) == 0
    assert capsys.readouterr().out == shown.read_text()  # a fixed point

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "training", "tune", "serve"} <= set(schema["properties"])

    with pytest.raises(ConfigError, match=r"training\.epoch: unknown key; did you mean 'training\.epochs'"):
        load_config(REPO / "configs" / "demo.yaml", {"training.epoch": 3})
    with pytest.raises(ConfigError, match=r"did you mean 'model\.fusion\.layers'"):
        load_config(REPO / "configs" / "demo.yaml", {"model.fusion.layerz": 3})
