"""One CLI style: every `--help` shows dash-style flags only, the underscore spellings still parse (hidden aliases),
`cman --version`, `import-digits --fsdd` required; configs are shipped as package data and found by name."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from tiny import REPO

from cman.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def test_every_help_shows_dash_flags_only() -> None:
    seen = 0
    for words, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert not re.findall(r"--[a-z]+_[a-z_]+", text), (words, text)
        seen += 1
    assert seen >= 12  # cman, demo-data, data (+3), train, eval, tune, index, serve, quickstart


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            ["train", "--config", "c", "--output_dir", "o", "--batch_size", "4", "--in_process", "--no_resume"],
            ["train", "--config", "c", "--output-dir", "o", "--batch-size", "4", "--in-process", "--no-resume"],
        ),
        (
            ["eval", "--config", "c", "--checkpoint", "k", "--output_dir", "o"],
            ["eval", "--config", "c", "--checkpoint", "k", "--output-dir", "o"],
        ),
        (
            ["tune", "--config", "c", "--num_samples", "3", "--max_concurrent", "2", "--output_dir", "o"],
            ["tune", "--config", "c", "--num-samples", "3", "--max-concurrent", "2", "--output-dir", "o"],
        ),
        (
            ["quickstart", "--output_dir", "o", "--num_samples", "2", "--no_serve"],
            ["quickstart", "--output-dir", "o", "--num-samples", "2", "--no-serve"],
        ),
        (
            ["data", "import-digits", "d", "--fsdd", "f", "--test_speakers", "a", "--val_speakers", "b"],
            ["data", "import-digits", "d", "--fsdd", "f", "--test-speakers", "a", "--val-speakers", "b"],
        ),
    ],
)
def test_old_spellings_still_parse(old: list[str], new: list[str]) -> None:
    parser = build_parser()
    parsed_old, parsed_new = vars(parser.parse_args(old)), vars(parser.parse_args(new))
    assert parsed_old == parsed_new
    assert parser.parse_args(["quickstart"]).output_dir == "outputs/quickstart"  # defaults survive the aliases


def test_version_and_required_fsdd(capsys) -> None:
    from cman import __version__

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"cman {__version__}"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["data", "import-digits", "out"])
    assert info.value.code == 2 and "--fsdd" in capsys.readouterr().err
    help_text = "".join(dict(_parsers(build_parser()))[("data", "import-digits")].format_help().split())
    assert "Jakobovski/free-spoken-digit-dataset" in help_text and "CCBY-SA4.0" in help_text  # (wrapped text)


def test_serve_model_uri_is_resolved_with_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cman.cli", "serve", "--model", str(tmp_path), "--index", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 1 and "is not a CMAN checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_packaging_lists_every_package_and_ships_the_configs() -> None:
    from cman.api import bundled_config

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("cman", "jobs", "tuning", "serve_app")
        for p in (REPO / top).rglob("__init__.py")
    }
    # data-only folders (the demo page) are packages too, so that setuptools ships them without a warning
    assert set(setuptools["packages"]) == on_disk | {"cman.configs", "serve_app.static"}
    assert setuptools["package-dir"]["cman.configs"] == "configs"
    assert bundled_config("demo") == REPO / "configs" / "demo.yaml"
    with pytest.raises(FileNotFoundError, match="bundled"):
        bundled_config("nope")
    assert build_parser().parse_args(["train", "--config", "demo"]).config == ["demo"]
    from cman.cli import _config_path

    assert _config_path("demo") == REPO / "configs" / "demo.yaml"
    assert _config_path("configs/demo.yaml") == "configs/demo.yaml"


def test_several_configs_merge_in_order_for_every_command(tmp_path: Path) -> None:
    """`cman train|tune|eval|index --config A --config B --set k=v`: B's keys over A's, mappings merged, --set last."""
    from cman.cli import build_parser
    from cman.cli_args import load_args_config

    over = tmp_path / "short.yaml"
    over.write_text("training: {epochs: 3}\nmodel: {fusion: {layers: 1}}\n")
    for command in ("train", "tune"):
        argv = [command, "--config", "demo", "--config", str(over), "--set", "training.batch_size=8"]
        config = load_args_config(build_parser().parse_args(argv))
        assert (config.training.epochs, config.training.batch_size, config.model.fusion.layers) == (3, 8, 1)
        assert config.model.fusion.width == 128 and config.data.neighbour_batches  # the rest is demo.yaml's
    # a relative model path given with --set is made absolute, as one in a config file is
    argv = [
        "train",
        "--config",
        "digits_whisper",
        "--set",
        "model.audio.pretrained=../shared/data/pretrained/whisper-tiny.en",
    ]
    audio = load_args_config(build_parser().parse_args(argv)).model.audio.pretrained
    assert Path(audio).is_absolute() and Path(audio).name == "whisper-tiny.en"
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {epochz: 3}\n")
    with pytest.raises(Exception, match=r"bad\.yaml: .*training\.epochz: unknown key; did you mean 'training\.epochs'"):
        load_args_config(build_parser().parse_args(["train", "--config", "demo", "--config", str(bad)]))
