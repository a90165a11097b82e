"""A checkpoint of a frozen hub base: a clear error naming the base when it cannot be loaded, and a self-contained
copy (bases stored inside) that loads without it and gives the same embeddings."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny import pretrained_config, save_tiny_backbones

from cman.models import CMAN, build_model
from cman.models.cman import MissingBaseError


def test_missing_base_is_named_and_a_self_contained_copy_loads_without_it(tmp_path, capsys) -> None:
    """`cman export` (`make_self_contained`) copies a checkpoint with its frozen hub bases inside."""
    from cman.cli import main

    dirs = save_tiny_backbones(tmp_path / "hub", audio="ast")
    model = build_model(pretrained_config(dirs)).eval()
    model.save_pretrained(tmp_path / "ckpt", metadata={"epoch": 2})
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "standalone")]) == 0
    assert "self-contained checkpoint written to" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "standalone")]) == 1
    assert "--out " + str(tmp_path / "standalone") + " already exists" in capsys.readouterr().err
    assert (tmp_path / "standalone" / "encoders" / "image" / "base" / "model.safetensors").is_file()
    tokens = model.processors["text"].collate([model.processors["text"].features("a small red circle")])
    with torch.no_grad():
        expected = model.embed_features({"text": tokens})

    shutil.rmtree(dirs["image"])  # the hub base is gone (no cache, no hub)
    with pytest.raises(MissingBaseError, match=rf"image encoder's base model '{dirs['image']}' could not be loaded"):
        CMAN.from_pretrained(tmp_path / "ckpt")
    standalone = CMAN.from_pretrained(tmp_path / "standalone")
    assert standalone.checkpoint_metadata["epoch"] == 2
    assert all(b["saved_base"] for b in standalone.checkpoint_metadata["base_models"].values())
    with torch.no_grad():
        torch.testing.assert_close(standalone.embed_features({"text": tokens}), expected, atol=1e-6, rtol=0)
