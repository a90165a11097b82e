"""LoRA on a real frozen pretrained encoder (all-MiniLM-L6-v2 from ../shared): what trains, what a checkpoint stores
(adapters + the base's identity, never a copy of it), reload equality, and the error for a different base."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import REPO, pretrained_config, save_tiny_backbones

from cman.config import ConfigError, load_config
from cman.engine import fit
from cman.modality import Modality
from cman.models.cman import CMAN, build_model

MINILM = REPO.parent / "shared" / "data" / "pretrained" / "all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # ../shared/data/README.md
CAPTIONS = ["a crimson disc at the left-hand side", "a large blue square on the right", "is there a tiny star?"]
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}

needs_minilm = pytest.mark.skipif(
    not (MINILM / "model.safetensors").is_file(), reason=f"the shared pretrained MiniLM is not at {MINILM}"
)


def _text_embeddings(model: CMAN, captions: list[str]) -> torch.Tensor:
    proc = model.processors[Modality.TEXT]
    batch = proc.collate([proc.features(proc.load(c)) for c in captions])
    with torch.no_grad():
        return model({Modality.TEXT: batch})[Modality.TEXT]


@pytest.fixture(scope="module")
def minilm_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/pretrained_text.yaml (audio/image/fusion shrunk) trained 1 epoch on 8 demo items, in process."""
    out = tmp_path_factory.mktemp("pretrained_text")
    sets = {
        "data.root": str(demo_root),
        "data.max_items": 8,
        "training.epochs": 1,
        "training.batch_size": 4,
        "model.fusion.layers": 1,
        "model.fusion.width": 32,
        "model.fusion.ffn": 64,
        "model.fusion.heads": 2,
        "model.embedding_dim": 32,
        "output_dir": str(out),
        **{f"model.{m}.init.{k}": v for m in ("audio", "image") for k, v in SMALL.items()},
    }
    fit(load_config(REPO / "configs" / "pretrained_text.yaml", sets), out, resume=False, progress=False)
    return out / "checkpoints" / "best"


@needs_minilm
def test_frozen_minilm_trains_only_adapters_and_is_not_copied(minilm_run: Path) -> None:
    meta = json.loads((minilm_run / "metadata.json").read_text())
    text = meta["parameters"]["encoders"]["text"]
    assert text["base_total"] > 22_000_000 and text["base_trainable"] == 0
    assert 0 < text["adapter_trainable"] <= 0.01 * text["base_total"]
    assert meta["parameters"]["encoders"]["audio"]["base_trainable"] > 0  # random-init audio trains its base
    base = meta["base_models"]["text"]
    assert base["saved_base"] is False and base["weights_sha256"] == MINILM_SHA256
    assert Path(base["source"]).resolve() == MINILM.resolve()  # the relative config path, resolved
    assert not (minilm_run / "encoders" / "text" / "base").exists()
    digest = {
        hashlib.sha256(f.read_bytes()).hexdigest() for f in minilm_run.rglob("*") if f.is_file() and f.stat().st_size
    }
    assert MINILM_SHA256 not in digest
    assert sum(f.stat().st_size for f in minilm_run.rglob("*") if f.is_file()) < 20_000_000  # MiniLM is 91 MB


@needs_minilm
def test_minilm_checkpoint_reloads_and_embeds_identically(minilm_run: Path) -> None:
    loaded = CMAN.from_pretrained(minilm_run)
    again = CMAN.from_pretrained(minilm_run)
    first = _text_embeddings(loaded, CAPTIONS)
    assert torch.equal(first, _text_embeddings(again, CAPTIONS))
    merged = _text_embeddings(again.merge_adapters(), CAPTIONS)  # what serving runs
    torch.testing.assert_close(merged, first, atol=1e-5, rtol=1e-4)
    trained = json.loads((minilm_run / "training_state.json").read_text())
    assert trained["epoch"] == 1


@needs_minilm
def test_minilm_checkpoint_refuses_a_different_base(minilm_run: Path, tmp_path: Path) -> None:
    other = save_tiny_backbones(tmp_path / "tiny")["text"]
    copy = tmp_path / "ckpt"
    shutil.copytree(minilm_run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["model"]["text"]["pretrained"] = str(other)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="does not match the one the adapters were trained on"):
        CMAN.from_pretrained(copy)


def test_same_architecture_other_weights_is_refused_by_hash(tmp_path: Path) -> None:
    dirs = save_tiny_backbones(tmp_path / "bases")
    config = pretrained_config(dirs)
    model = build_model(config)
    meta = json.loads((model.save_pretrained(tmp_path / "ckpt") / "metadata.json").read_text())
    text = meta["base_models"]["text"]
    assert text["saved_base"] is False and len(text["weights_sha256"]) == 64
    CMAN.from_pretrained(tmp_path / "ckpt")  # the same base loads
    from transformers import AutoModel

    base = AutoModel.from_pretrained(dirs["text"])
    with torch.no_grad():
        base.embeddings.word_embeddings.weight.add_(0.01)
    base.save_pretrained(dirs["text"])  # same architecture and size, other weights
    with pytest.raises(ValueError, match="weights sha256"):
        CMAN.from_pretrained(tmp_path / "ckpt")


def test_relative_pretrained_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    dirs = save_tiny_backbones(tmp_path / "models")
    text = {"pretrained": "../models/text", "max_length": 16}
    config = {"model": {"text": text, "fusion": {"layers": 1, "heads": 2, "width": 32, "ffn": 64}}}
    (project / "configs" / "c.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # not found from the cwd: found from the project root of the config
    monkeypatch.delenv("CMAN_ROOT", raising=False)
    assert load_config(project / "configs" / "c.yaml").model.text.pretrained == str(dirs["text"].resolve())
    text["pretrained"] = "../nowhere/text"
    (project / "configs" / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"model\.text\.pretrained: '\.\./nowhere/text' not found"):
        load_config(project / "configs" / "c.yaml")
    monkeypatch.setenv("CMAN_ROOT", str(tmp_path / "models"))  # a `ray job submit` driver: CMAN_ROOT in its env
    text["pretrained"] = "./text"
    (project / "configs" / "c.yaml").write_text(yaml.safe_dump(config))
    assert load_config(project / "configs" / "c.yaml").model.text.pretrained == str(dirs["text"].resolve())
