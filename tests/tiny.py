"""What the tests share: the repo root, tiny configs, tiny HF backbones built in code (loaded via `from_pretrained`).

Light to import (transformers only loads when a backbone is built), so any test module can take `REPO` from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cman.config import CMANConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a small red circle on the left",
    "a large blue square on the right",
    "there is a small green star in the middle",
    "on the left a large yellow triangle",
]
_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# configs/demo.yaml with 1-layer encoders and fusion: a few seconds per epoch on 2 cores
ONE_LAYER = {
    "model.text.init.num_hidden_layers": 1,
    "model.audio.init.num_hidden_layers": 1,
    "model.image.init.num_hidden_layers": 1,
    "model.fusion.layers": 1,
}


def tiny_config(root: Path | str, sizes: dict[str, Any] | None = None, **overrides: Any) -> CMANConfig:
    """configs/demo.yaml on the dataset at `root` with 1-layer models (`ONE_LAYER`), then `sizes`, then `overrides`
    (dotted keys: `tiny_config(root, SIZES, **{"training.epochs": 2})`)."""
    sets = {"data.root": str(root), **ONE_LAYER, **(sizes or {}), **overrides}
    return load_config(REPO / "configs" / "demo.yaml", sets)


def save_tiny_backbones(root: Path, audio: str = "ast") -> dict[str, Path]:
    """Write tiny RoBERTa / AST-or-HuBERT / ViT checkpoints (+ processors) under `root`; return their dirs."""
    from transformers import (
        ASTConfig,
        ASTFeatureExtractor,
        ASTModel,
        HubertConfig,
        HubertModel,
        RobertaConfig,
        RobertaModel,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
        Wav2Vec2FeatureExtractor,
    )

    from cman.data.text import train_tokenizer

    dirs = {m: root / m for m in ("text", "audio", "image")}
    tok = train_tokenizer(CAPTIONS * 5, vocab_size=120)
    RobertaModel(RobertaConfig(vocab_size=len(tok), max_position_embeddings=40, **_TINY)).save_pretrained(dirs["text"])
    tok.save_pretrained(dirs["text"])
    if audio == "ast":
        ASTModel(ASTConfig(num_mel_bins=32, max_length=64, **_TINY)).save_pretrained(dirs["audio"])
        ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(dirs["audio"])
    else:
        cfg = HubertConfig(
            conv_dim=(16, 16),
            conv_stride=(5, 4),
            conv_kernel=(10, 4),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            **_TINY,
        )
        HubertModel(cfg).save_pretrained(dirs["audio"])
        Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(dirs["audio"])
    ViTModel(ViTConfig(image_size=32, patch_size=8, **_TINY)).save_pretrained(dirs["image"])
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(dirs["image"])
    return dirs


def pretrained_config(dirs: dict[str, Path], **overrides: Any) -> CMANConfig:
    """A config whose encoders load the tiny local checkpoints with `from_pretrained` (LoRA on frozen bases)."""
    data = {
        "model": {
            "text": {"pretrained": str(dirs["text"]), "max_length": 24},
            "audio": {"pretrained": str(dirs["audio"]), "max_seconds": 1.0},
            "image": {"pretrained": str(dirs["image"])},
            "fusion": {"layers": 1, "heads": 2, "width": 32, "ffn": 64},
            "embedding_dim": 16,
        },
        "peft": {"rank": 4, "alpha": 8},
    }
    return CMANConfig.model_validate(data).with_overrides(overrides)


def tiny_demo_config(root: Path | str, **overrides: Any) -> CMANConfig:
    """configs/demo.yaml shrunk to 1-layer, 32-wide encoders: trains in seconds."""
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    sets: dict[str, Any] = {
        "data.root": str(root),
        "training.epochs": 2,
        "training.batch_size": 8,
        "model.fusion.layers": 1,
        "model.fusion.width": 32,
        "model.fusion.ffn": 64,
        "model.fusion.heads": 2,
        "model.embedding_dim": 32,
    }
    for modality in ("text", "audio", "image"):
        for key, value in small.items():
            sets[f"model.{modality}.init.{key}"] = value
    sets.update(overrides)
    return load_config(REPO / "configs" / "demo.yaml", sets)
