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
    ["train"],
    ["eval"],
    ["tune"],
    ["index"],
    ["serve"],
    ["quickstart"],
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
        (["data", "import-digits", "/tmp/x", "--fsdd", "/nonexistent"], "FSDD directory /nonexistent not found"),
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
