"""Whisper's encoder as a CMAN audio backbone (cman.models.whisper): a tiny random-init Whisper saved the way OpenAI's
checkpoints are (a whole WhisperForConditionalGeneration) loads as its encoder alone, frozen, LoRA on every layer's
q/k/v, its window cut to `max_seconds`, padding masked out; checkpoints hold adapters and the base's identity, reload
and serve identically. One test loads the real whisper-tiny.en from ../shared."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import REPO

from cman.config import CMANConfig, load_config
from cman.modality import Modality
from cman.models.cman import CMAN, build_model, make_self_contained
from cman.models.lora import lora_module_count

WHISPER_TINY_EN = REPO.parent / "shared" / "data" / "pretrained" / "whisper-tiny.en"
WINDOW_S = 0.5  # 50 mel frames, 25 encoder positions (the tiny model has 100: 2 s)
RATE = 16000

needs_whisper = pytest.mark.skipif(
    not (WHISPER_TINY_EN / "model.safetensors").is_file(), reason=f"the shared Whisper is not at {WHISPER_TINY_EN}"
)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Whisper (encoder + decoder, as on the hub) and its feature extractor, in one directory."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    directory = tmp_path_factory.mktemp("whisper")
    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=100,
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)
    return directory


def _config(source: Path | str, **overrides: object) -> CMANConfig:
    data = {
        "model": {
            "audio": {"pretrained": str(source), "max_seconds": WINDOW_S},
            "fusion": {"layers": 1, "heads": 2, "width": 32, "ffn": 64, "pool": "mean"},
            "embedding_dim": 16,
        },
        "peft": {"rank": 4, "alpha": 8},
    }
    return CMANConfig.model_validate(data).with_overrides(dict(overrides))


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)  # (samples,)


def _embed(model: CMAN, clips: list[np.ndarray]) -> torch.Tensor:
    proc = model.processors[Modality.AUDIO]
    batch = proc.collate([proc.features(c) for c in clips])
    with torch.no_grad():
        return model({Modality.AUDIO: batch})[Modality.AUDIO]  # (batch, embedding_dim)


def test_only_the_encoder_loads_frozen_with_lora_on_every_layer(whisper_dir: Path) -> None:
    model = build_model(_config(whisper_dir))
    backbone = model.encoders["audio"].backbone
    base = backbone.get_base_model()
    assert type(base).__name__ == "WhisperAudioEncoder"
    assert not any("decoder" in name or "proj_out" in name for name, _ in model.named_parameters())
    for layer in base.layers:
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert len(getattr(layer.self_attn, proj).lora_A) == 1, f"no LoRA on {proj}"
    assert lora_module_count(backbone) == 2 * 3
    report = model.parameter_report()["audio"]
    assert report["base_trainable"] == 0 and report["adapter_trainable"] == 2 * 3 * 4 * (32 + 32)
    assert all(not p.requires_grad for n, p in backbone.named_parameters() if "lora_" not in n)


def test_window_is_cut_to_max_seconds(whisper_dir: Path) -> None:
    from transformers import WhisperModel

    model = build_model(_config(whisper_dir))
    base = model.encoders["audio"].backbone.get_base_model()
    assert base.embed_positions.num_embeddings == 25 and base.config.max_source_positions == 25
    full = WhisperModel.from_pretrained(whisper_dir).get_encoder().embed_positions.weight  # (100, 32)
    assert torch.equal(base.embed_positions.weight, full[:25])
    proc = model.processors[Modality.AUDIO]
    long, cut = proc.features(_clip(1.6)), proc.features(_clip(1.6)[: int(WINDOW_S * RATE)])
    assert long["input_features"].shape == (80, 50)  # not 3000 frames: the window, not 30 s
    assert torch.equal(long["input_features"], cut["input_features"]) and int(long["attention_mask"].sum()) == 50
    with pytest.raises(ValueError, match=r"model\.audio\.max_seconds: 3 s needs 150 encoder positions"):
        build_model(_config(whisper_dir, **{"model.audio.max_seconds": 3.0}))


def test_frames_past_a_clip_are_masked_out(whisper_dir: Path) -> None:
    model = build_model(_config(whisper_dir, **{"model.audio.tokens": "sequence"})).eval()
    short, long = _clip(0.13, seed=1), _clip(0.45, seed=2)
    alone, batched = _embed(model, [short]), _embed(model, [short, long])
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-4)  # padding to the batch changes nothing
    proc = model.processors[Modality.AUDIO]
    features = proc.collate([proc.features(short), proc.features(long)])
    with torch.no_grad():
        tokens, mask = model.encode_tokens(Modality.AUDIO, features)  # (2, 25, 32), (2, 25)
        frames = math.ceil(short.size / 160)
        assert mask[0].sum().item() == math.ceil(frames / 2) and mask[1].sum().item() == math.ceil(45 / 2)
        garbage = torch.where(mask[..., None], tokens, 1e3 * torch.randn_like(tokens))  # noise where masked
        fused = model.fuse({Modality.AUDIO: (tokens, mask)})
        torch.testing.assert_close(model.fuse({Modality.AUDIO: (garbage, mask)}), fused, atol=1e-5, rtol=1e-4)


def test_checkpoint_holds_adapters_and_identity_and_reloads(whisper_dir: Path, tmp_path: Path) -> None:
    model = build_model(_config(whisper_dir)).eval()
    clips = [_clip(0.3, seed=3), _clip(0.7, seed=4)]
    expected = _embed(model, clips)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((ckpt / "metadata.json").read_text())["base_models"]["audio"]
    weights = whisper_dir / "model.safetensors"
    assert meta["saved_base"] is False and meta["source"] == str(whisper_dir)
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["fingerprint"]["max_source_positions"] == 25
    assert not (ckpt / "encoders" / "audio" / "base").exists()
    stored = sum(f.stat().st_size for f in (ckpt / "encoders").rglob("*") if f.is_file())
    assert stored < weights.stat().st_size / 10  # adapters + extractor config, no copy of the encoder
    loaded = CMAN.from_pretrained(ckpt)
    assert torch.equal(_embed(loaded, clips), expected)
    torch.testing.assert_close(_embed(loaded.merge_adapters(), clips), expected, atol=1e-5, rtol=1e-4)  # serving
    alone = make_self_contained(ckpt, tmp_path / "alone")  # the encoder (only) stored: loads without the source
    assert (alone / "encoders" / "audio" / "base" / "model.safetensors").stat().st_size < weights.stat().st_size
    torch.testing.assert_close(_embed(CMAN.from_pretrained(alone), clips), expected, atol=1e-6, rtol=1e-5)


def _wav(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV")
    return buf.getvalue()


def test_serving_replica_merges_and_bounds_audio(whisper_dir: Path, tmp_path: Path) -> None:
    from serve_app.encoders import ModalityEncoderServer

    build_model(_config(whisper_dir)).save_pretrained(tmp_path / "ckpt")
    server = ModalityEncoderServer(str(tmp_path / "ckpt"), "audio")
    assert type(server.encoder.backbone).__name__ == "WhisperAudioEncoder"  # adapters merged into the base
    encode_batch = ModalityEncoderServer.encode.__wrapped__
    # too short; 3200 samples at 8 kHz (0.4 s: resampled to 16 kHz, 20 positions); 3 s (cut at 0.5 s: 25)
    payloads = [_wav(_clip(0.005), RATE), _wav(_clip(0.2), 8000), _wav(_clip(3.0), RATE)]
    short, low_rate, long = asyncio.run(encode_batch(server, payloads))
    assert short["status"] == 415 and "too short" in short["error"]
    assert low_rate["tokens"].shape == (20, 32) and long["tokens"].shape == (25, 32)  # (positions, width)
    server.check_health()


def test_trains_in_process_on_the_demo_data(whisper_dir: Path, demo_root: Path, tmp_path: Path) -> None:
    from cman.engine import fit

    sets = {
        "data.root": str(demo_root),
        "data.max_items": 8,
        "training.epochs": 1,
        "training.batch_size": 4,
        "model.audio.pretrained": str(whisper_dir),
        "model.audio.max_seconds": 2.0,
        "model.fusion.layers": 1,
        "model.fusion.width": 32,
        "model.fusion.ffn": 64,
        "model.fusion.heads": 2,
        "model.embedding_dim": 32,
        "model.text.init": {
            "model_type": "roberta",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 66,
        },
        "model.text.pretrained": None,
        "model.text.freeze_base": False,
        "output_dir": str(tmp_path),
    }
    sets.update({f"model.image.init.{k}": v for k, v in {"hidden_size": 32, "intermediate_size": 64}.items()})
    report = fit(load_config(REPO / "configs" / "pretrained.yaml", sets), tmp_path, resume=False, progress=False)
    assert "audio->text" in report["test"]["directions"]
    meta = json.loads((tmp_path / "checkpoints" / "best" / "metadata.json").read_text())
    assert meta["parameters"]["encoders"]["audio"]["base_trainable"] == 0


@needs_whisper
def test_real_whisper_tiny_trains_under_one_percent() -> None:
    config = load_config(REPO / "configs" / "digits_whisper.yaml")
    assert Path(config.model.audio.pretrained) == WHISPER_TINY_EN.resolve()  # `../shared/...`, resolved
    model = build_model(config, captions=["zero", "one", "two"])
    report = model.parameter_report()["audio"]
    assert report["base_total"] > 7_000_000 and report["base_trainable"] == 0
    assert 0 < report["adapter_trainable"] <= 0.01 * report["base_total"]
    base = model.encoders["audio"].backbone.get_base_model()
    assert len(base.layers) == 4 and lora_module_count(model.encoders["audio"].backbone) == 4 * 3
    assert base.embed_positions.num_embeddings == math.ceil(config.model.audio.max_seconds * 50)
    assert not any("decoder" in name for name, _ in model.named_parameters())
