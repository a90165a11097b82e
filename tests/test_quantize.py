"""`serve.quantize: int8`: an encoder replica's Linear layers really become int8 (after LoRA is merged), its tokens
stay fp32 and close to the fp32 replica's, `cman index` follows the setting, and a bad value names the setting."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from pydantic import ValidationError
from tiny import CAPTIONS, REPO, pretrained_config, save_tiny_backbones, tiny_demo_config
from torch import nn

from cman.config import ConfigError, ServeConfig, load_config
from cman.quantize import int8_linear_count, quantize_linear


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny RoBERTa / AST / ViT bases with LoRA adapters: a replica merges them before quantizing."""
    from cman.models import build_model

    root = tmp_path_factory.mktemp("quantize")
    model = build_model(pretrained_config(save_tiny_backbones(root / "hub")))
    with torch.no_grad():  # non-zero adapters, so that merging them changes the weights that get quantized
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model.save_pretrained(root / "ckpt")


def _payload(modality: str) -> str | bytes:
    if modality == "text":
        return "a small red circle on the left"
    buf = io.BytesIO()
    if modality == "audio":
        sf.write(buf, (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000, format="WAV")
    else:
        Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("modality", ["text", "audio", "image"])
def test_int8_replica_has_int8_linear_layers_and_fp32_tokens_close_to_fp32(checkpoint: Path, modality: str) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from serve_app.encoders import ModalityEncoderServer

    fp32 = ModalityEncoderServer(str(checkpoint), modality, ServeConfig(dtype="fp32"))
    int8 = ModalityEncoderServer(str(checkpoint), modality, ServeConfig(quantize="int8"))
    linear = [m for m in fp32.encoder.modules() if type(m) is nn.Linear]
    quantized = [m for m in int8.encoder.modules() if isinstance(m, DynamicLinear)]
    assert not any(type(m) is nn.Linear for m in int8.encoder.modules())  # every Linear replaced, the LoRA ones too
    assert len(quantized) == len(linear) == int8_linear_count(int8.encoder) > 0
    assert all(m._packed_params.dtype == torch.qint8 and m.weight().dtype == torch.qint8 for m in quantized)
    assert not any("lora_" in name for name, _ in int8.encoder.named_modules())  # quantized after merge_adapters
    assert int8.parameters == fp32.parameters  # counted before quantizing
    info = int8.info()
    assert info["quantize"] == "int8" and info["dtype"] == "fp32" and "int8 Linear layers" in info["numerics"]
    assert fp32.info()["quantize"] == "none"

    encode = ModalityEncoderServer.encode.__wrapped__
    (a,), (b,) = (asyncio.run(encode(server, [_payload(modality)])) for server in (fp32, int8))
    assert b["tokens"].dtype == np.float32 and b["tokens"].shape == a["tokens"].shape
    assert (a["mask"] == b["mask"]).all()
    x, y = a["tokens"].ravel(), b["tokens"].ravel()
    assert float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) > 0.9
    int8.check_health()


def test_bad_values_name_serve_quantize() -> None:
    with pytest.raises(ValidationError, match="quantize"):
        ServeConfig(quantize="int4")
    with pytest.raises(ConfigError, match=r"serve\.quantize"):
        load_config(REPO / "configs" / "demo.yaml", {"serve.quantize": "int4"})
    with pytest.raises(ValueError, match=r"serve\.quantize 'int4' is not one of none, int8"):
        quantize_linear(nn.Linear(4, 4), "int4")
    with pytest.raises(ValidationError, match=r"serve\.quantize int8 .* serve\.dtype"):
        ServeConfig(quantize="int8", dtype="bf16")
    assert ServeConfig().quantize == "none" and ServeConfig(quantize="int8").dtype == "auto"


def test_quantize_logs_once_and_none_leaves_the_module_alone(caplog: pytest.LogCaptureFixture) -> None:
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    assert quantize_linear(plain, "none", purpose="test-none") is plain and int8_linear_count(plain) == 0
    with caplog.at_level(logging.INFO, logger="cman.quantize"):
        for _ in range(3):
            quantize_linear(nn.Sequential(nn.Linear(8, 8)).eval(), "int8", purpose="test-logging")
    said = [r.getMessage() for r in caplog.records if "test-logging" in r.getMessage()]
    assert len(said) == 1 and "serve.quantize=int8" in said[0]


def test_cman_index_follows_serve_quantize(demo_root: Path, tmp_path: Path) -> None:
    from cman.models import build_model
    from jobs.build_index import build_index

    checkpoint = build_model(tiny_demo_config(demo_root), CAPTIONS).save_pretrained(tmp_path / "ckpt")
    out = {}
    for mode in ("none", "int8"):
        build_index(checkpoint, "test", tmp_path / mode, serve=ServeConfig(quantize=mode), progress=False)
        out[mode] = json.loads((tmp_path / mode / "index_meta.json").read_text())
    assert out["none"]["quantize"] == "none" and out["int8"]["quantize"] == "int8"
    assert out["int8"]["counts"] == out["none"]["counts"]
