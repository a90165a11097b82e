"""`cman` CLI: every subcommand has --help; bad arguments and files are one line on stderr, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny import REPO

SUBCOMMANDS = [
    ["demo-data"],
    ["data", "validate"],
    ["data", "import-digits"],
    ["data", "import-coco"],
    ["data", "import-flickr8k-audio"],
    ["data", "import-manifest"],
    ["train"],
    ["eval"],
    ["tune"],
    ["index"],
    ["serve"],
    ["quickstart"],
    ["config", "show"],
    ["config", "schema"],
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cman.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_help_for_every_subcommand():
    from cman.cli import build_parser

    parser = build_parser()
    for words in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*words, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--config", "configs/nope.yaml"], "cman train: error: config file configs/nope.yaml not found"),
        (["train", "--config", "configs/demo.yaml", "--set", "peft.rank=0"], "peft.rank: Input should be greater"),
        (["train", "--config", "configs/demo.yaml", "--set", "nokey"], "expected KEY=VALUE"),
        (["eval", "--config", "configs/demo.yaml", "--checkpoint", "/nonexistent"], "is not a CMAN checkpoint"),
        (
            ["data", "validate", "--config", "configs/demo.yaml", "--set", "data.root=/nonexistent"],
            "metadata file /nonexistent/metadata/train_metadata.json not found",
        ),
        (["serve", "--set", "serve.encoder_replicas=two"], "--set serve.encoder_replicas: Input should be a valid"),
        (["serve", "--set", "serve.no_such_key=1"], "--set serve.no_such_key: Extra inputs are not permitted"),
        (["serve", "--set", "training.epochs=2"], "`cman serve` takes serve.* keys only"),
        (["data", "import-digits", "/tmp/x", "--fsdd", "/nonexistent"], "FSDD directory /nonexistent not found"),
        (["data", "import-manifest", "/nonexistent/out", "/nonexistent.csv"], "manifest /nonexistent.csv not found"),
        (
            ["index", "--checkpoint", "/nonexistent", "--from-folder", "/nonexistent", "--out", "/tmp/x"],
            "is not a CMAN checkpoint",
        ),
    ],
)
def test_errors_are_one_line_without_traceback(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stderr
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "Warning" not in line and not line.startswith("  ")
    ]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr


def test_argument_errors_exit_2():
    proc = run_cli("train")
    assert proc.returncode == 2 and "--config" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_and_index_default_to_the_checkpoints_own_config(trained_checkpoint, demo_root, tmp_path):
    """No --config: `cman eval` / `cman index` read the checkpoint's config.yaml (`--set` still applies)."""
    import json

    from cman.cli import main

    root = f"data.root={demo_root}"
    assert main(["eval", "--checkpoint", str(trained_checkpoint), "--set", root, "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "eval_test.json").read_text())["split"] == "test"
    out = tmp_path / "index"
    assert (
        main(["index", "--checkpoint", str(trained_checkpoint), "--set", root, "--out", str(out), "--in-process"]) == 0
    )
    assert (out / "index_meta.json").is_file()


def test_python_dash_m_cman_is_the_cman_command():
    proc = subprocess.run([sys.executable, "-m", "cman", "--version"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("cman "), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("argv", "hidden", "extra"),
    [
        (["tune", "--config", "configs/demo.yaml"], "ray", "tune"),
        (["data", "import-digits", "OUT", "--fsdd", "../shared/data/fsdd"], "sklearn", "demo"),
        (["demo-data", "OUT"], "espeakng_loader", "demo"),
    ],
)
def test_a_missing_extra_is_named(argv, hidden, extra, monkeypatch, capsys, tmp_path):
    """A command whose optional dependency is not installed says which extra installs it (one line, exit 1)."""
    from cman.cli import main, missing_extra

    assert missing_extra("train", "numpy") is None  # a core module is a real error, not a missing extra
    import cman.data.tts

    monkeypatch.setattr(cman.data.tts, "_ENGINE", None)  # an engine another test started would not import again
    for name in [n for n in sys.modules if n == hidden or n.startswith(hidden + ".")] or [hidden]:
        monkeypatch.setitem(sys.modules, name, None)  # `import <hidden>(.x)` now fails as if it were not installed
    monkeypatch.chdir(REPO)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'cman[{extra}]'" in err and repr(hidden) in err, err


def test_serve_set_builds_the_serve_settings():
    from cman.cli import serve_overrides

    settings = serve_overrides(
        ["serve.ingress_replicas=2", "serve.num_cpus_per_replica=0.1", "serve.encoder_autoscaling.max_replicas=3"]
    )
    assert settings == {"ingress_replicas": 2, "num_cpus_per_replica": 0.1, "encoder_autoscaling": {"max_replicas": 3}}
