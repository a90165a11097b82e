"""In-process training writes the contract's files and resumes where it stopped (this 1-layer model's 3-epoch loss
is not monotone, so no claim about learning is made here)."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_demo_config

from cman.data.demo import generate_demo_dataset
from cman.metrics import DIRECTIONS
from cman.models import CMAN
from cman.training import evaluate_checkpoint, fit


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_dataset(root, seed=1, counts={"train": 48, "val": 16, "test": 16})
    return root


def test_fit_writes_checkpoints_and_eval_json(demo_root, tmp_path):
    cfg = tiny_demo_config(demo_root)
    report = fit(cfg, tmp_path / "run", progress=False)
    for name in ("best", "last"):
        ckpt = tmp_path / "run" / "checkpoints" / name
        assert (ckpt / "config.yaml").is_file() and (ckpt / "metadata.json").is_file()
        assert (ckpt / "heads.safetensors").is_file()
    assert json.loads((tmp_path / "run/checkpoints/last/metadata.json").read_text())["epoch"] == 2
    result = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    assert result["split"] == "test" and set(result["directions"]) == set(DIRECTIONS)
    for values in result["directions"].values():
        assert {"R@1", "R@5", "R@10", "medR"} <= set(values)
        assert 0 <= values["R@1"] <= values["R@5"] <= values["R@10"] <= 100
    assert result["rsum"] == pytest.approx(sum(v["R@1"] + v["R@5"] + v["R@10"] for v in result["directions"].values()))
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    # the best checkpoint alone reproduces its metrics
    again = evaluate_checkpoint(tmp_path / "run/checkpoints/best", "test")
    assert again["rsum"] == pytest.approx(result["rsum"], abs=1e-4)
    assert isinstance(CMAN.from_pretrained(tmp_path / "run/checkpoints/best"), CMAN)


def test_rerun_resumes_instead_of_starting_over(demo_root, tmp_path):
    out = tmp_path / "run"
    first = fit(tiny_demo_config(demo_root, **{"training.epochs": 3}), out, progress=False)
    straight = [h["train_loss"] for h in first["history"]]
    # interrupt after epoch 2, then rerun the same command
    out2 = tmp_path / "run2"
    stopped = fit(tiny_demo_config(demo_root, **{"training.epochs": 3}), out2, progress=False, stop_after=2)
    assert stopped["stopped"] and [h["epoch"] for h in stopped["history"]] == [1, 2]
    resumed = fit(tiny_demo_config(demo_root, **{"training.epochs": 3}), out2, progress=False)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # epoch 3 after resume matches the uninterrupted run (model, optimiser, schedule and RNG restored)
    assert resumed["history"][2]["train_loss"] == pytest.approx(straight[2], rel=1e-4)
