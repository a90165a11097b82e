"""Per-modality preprocessing: raw input (file path, bytes, text) → model tensors, and batch collation.

Each processor wraps the encoder's own HF processor (tokenizer, feature extractor, image processor), is saved
inside a checkpoint, and is shared by training, evaluation, indexing and the Serve encoders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    ASTFeatureExtractor,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessorPil,
    ViTImageProcessorPil,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)

from cman.config import EncoderConfig
from cman.data.audio import decode_audio, whisper_window_frames
from cman.data.image import decode_image
from cman.data.text import clean_caption, train_tokenizer
from cman.modality import Modality

Features = dict[str, torch.Tensor]
_META = "cman_processor.json"


class TextProcessor:
    modality = Modality.TEXT

    def __init__(self, tokenizer: Any, max_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def load(self, source: Any, item_id: str | None = None) -> str:
        return clean_caption(source, item_id=item_id)

    def features(self, raw: str) -> Features:
        enc = self.tokenizer(raw, truncation=True, max_length=self.max_length)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (tokens,)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def collate(self, items: list[Features]) -> Features:
        pad_id = self.tokenizer.pad_token_id or 0
        return {
            "input_ids": pad_sequence([i["input_ids"] for i in items], batch_first=True, padding_value=pad_id),
            "attention_mask": pad_sequence([i["attention_mask"] for i in items], batch_first=True),
        }  # (batch, tokens)

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)
        _write_meta(directory, {"kind": "text", "max_length": self.max_length})


class AudioProcessor:
    modality = Modality.AUDIO

    def __init__(self, extractor: Any, max_seconds: float = 10.0, normalize: str = "dataset") -> None:
        self.extractor = extractor
        self.max_seconds = max_seconds
        self.sampling_rate = int(extractor.sampling_rate)
        self.spectrogram = isinstance(extractor, ASTFeatureExtractor)
        self.whisper = isinstance(extractor, WhisperFeatureExtractor)
        if self.whisper and normalize != "dataset":
            raise ValueError(
                f"model.audio.normalize: {normalize!r} is for AST spectrograms; Whisper's log-mel features are "
                "normalised by its own feature extractor: remove normalize"
            )
        if normalize not in ("dataset", "utterance"):
            raise ValueError(f"audio normalize must be 'dataset' or 'utterance', not {normalize!r}")
        self.normalize = normalize

    def load(self, source: Any, item_id: str | None = None) -> np.ndarray:
        return decode_audio(source, self.sampling_rate, max_seconds=self.max_seconds, item_id=item_id)

    def features(self, raw: np.ndarray) -> Features:
        if self.whisper:
            return self._whisper_features(raw)
        out = self.extractor(raw, sampling_rate=self.sampling_rate, return_tensors="np")
        values = torch.from_numpy(np.asarray(out["input_values"][0], dtype=np.float32))
        # AST: (frames, mel_bins), padded by the extractor to max_length; waveform models: (samples,)
        if self.spectrogram and self.normalize == "utterance":
            values = utterance_normalize(values, fbank_frames(raw.shape[0], self.sampling_rate))
        return {"input_values": values}

    def _whisper_features(self, raw: np.ndarray) -> Features:
        """Whisper's 80-bin log-mel over a `max_seconds` window (not 30 s): the clip, then silence, as Whisper was
        trained; `attention_mask` marks the clip's own frames, so pooling and fusion ignore the padding."""
        frames = whisper_window_frames(self.max_seconds)
        out = self.extractor(
            raw,
            sampling_rate=self.sampling_rate,
            padding="max_length",
            max_length=frames * self.extractor.hop_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        values = torch.from_numpy(np.asarray(out["input_features"][0], dtype=np.float32))  # (mel_bins, frames)
        mask = torch.from_numpy(np.asarray(out["attention_mask"][0], dtype=np.int64))  # (frames,)
        return {"input_features": values, "attention_mask": mask}

    def collate(self, items: list[Features]) -> Features:
        if self.whisper:  # every clip is padded to the window already
            return {
                "input_features": torch.stack([i["input_features"] for i in items]),  # (batch, mel_bins, frames)
                "attention_mask": torch.stack([i["attention_mask"] for i in items]),  # (batch, frames)
            }
        values = [i["input_values"] for i in items]
        if self.spectrogram:
            return {"input_values": torch.stack(values)}  # (batch, frames, mel_bins)
        lengths = torch.tensor([v.shape[0] for v in values])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()  # (batch, samples)
        return {"input_values": pad_sequence(values, batch_first=True), "attention_mask": mask}

    def save(self, directory: Path) -> None:
        self.extractor.save_pretrained(directory)
        _write_meta(directory, {"kind": "audio", "max_seconds": self.max_seconds, "normalize": self.normalize})


def fbank_frames(samples: int, sampling_rate: int) -> int:
    """Frames of a Kaldi fbank (25 ms window, 10 ms hop, edges snipped) of `samples` samples."""
    window, hop = sampling_rate * 25 // 1000, sampling_rate // 100
    return max(1, (samples - window) // hop + 1)


def utterance_normalize(values: torch.Tensor, frames: int) -> torch.Tensor:
    """Remove the utterance's mean per mel bin and divide by 2x its std over the real frames; padding becomes 0.

    Cancels the channel (microphone, room, loudness) and part of the speaker's spectral colouring.  # (frames, bins)
    """
    frames = min(frames, values.shape[0])
    real = values[:frames]
    std = real.std() if frames > 1 else torch.ones(())
    out = torch.zeros_like(values)
    out[:frames] = (real - real.mean(dim=0, keepdim=True)) / (2 * std.clamp_min(1e-5))
    return out


class ImageProcessor:
    modality = Modality.IMAGE

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def load(self, source: Any, item_id: str | None = None) -> Any:
        return decode_image(source, item_id=item_id)

    def features(self, raw: Any) -> Features:
        out = self.processor(images=raw, return_tensors="np")
        return {"pixel_values": torch.from_numpy(np.asarray(out["pixel_values"][0], dtype=np.float32))}  # (3, H, W)

    def collate(self, items: list[Features]) -> Features:
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items])}  # (batch, 3, H, W)

    def save(self, directory: Path) -> None:
        self.processor.save_pretrained(directory)
        _write_meta(directory, {"kind": "image"})


Processor = TextProcessor | AudioProcessor | ImageProcessor


def lite_image_processor(size: int = 224) -> CLIPImageProcessorPil:
    """EfficientNet-Lite's preprocessing: shorter side to `size` (PIL bilinear), centre crop `size`x`size`, RGB,
    (x - 127) / 128 (rescale by 1/128, then mean 127/128, std 1). EXIF orientation is applied on decoding
    (cman.data.image); an HF image processor, so checkpoints, the feature cache and Serve handle it like any other."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=2,  # PIL.Image.BILINEAR
        rescale_factor=1 / 128,
        image_mean=[127 / 128] * 3,
        image_std=[1.0] * 3,
    )


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    Path(directory, _META).write_text(json.dumps(meta))


def build_processor(modality: Modality, cfg: EncoderConfig, captions: list[str] | None = None) -> Processor:
    """The processor for a fresh model: loaded from `cfg.processor`/`cfg.pretrained`, or built for `cfg.init`."""
    source = cfg.processor or cfg.pretrained
    init = cfg.init or {}
    if modality == Modality.TEXT:
        if source is not None:
            tokenizer = AutoTokenizer.from_pretrained(source)
        elif captions:
            tokenizer = train_tokenizer(captions, vocab_size=int(init.get("vocab_size", 1000)))
        else:
            raise ValueError(
                "model.text.init needs training captions to train a tokenizer (or set model.text.processor)"
            )
        return TextProcessor(tokenizer, max_length=cfg.max_length or 64)
    if modality == Modality.AUDIO:
        if source is not None:
            extractor = AutoFeatureExtractor.from_pretrained(source)
        elif init["model_type"] == "whisper":
            extractor = WhisperFeatureExtractor(feature_size=int(init.get("num_mel_bins", 80)))
        elif init["model_type"] == "audio-spectrogram-transformer":
            extractor = ASTFeatureExtractor(
                num_mel_bins=int(init.get("num_mel_bins", 128)), max_length=int(init.get("max_length", 1024))
            )
        else:
            extractor = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)
        if cfg.max_length is not None and isinstance(extractor, ASTFeatureExtractor):
            extractor.max_length = cfg.max_length
        return AudioProcessor(extractor, max_seconds=cfg.max_seconds, normalize=cfg.normalize)
    return _image_processor(cfg, source)


def _image_processor(cfg: EncoderConfig, source: str | None) -> ImageProcessor:
    """An EfficientNet-Lite backbone (weights directory, .pth, or `init`) selects its own preprocessing; an HF one
    its `preprocessor_config.json`; a random-init ViT a plain resize to `image_size`."""
    from cman.models.efficientnet import MODEL_TYPE, lite_config  # at call time: cman.models imports this module

    init = cfg.init or {}
    lite = lite_config(cfg.pretrained) if cfg.processor is None else None
    if lite is not None or init.get("model_type") == MODEL_TYPE:
        size = int(cfg.image_size or (lite.image_size if lite is not None else init.get("image_size", 224)))
        return ImageProcessor(lite_image_processor(size))
    if source is not None:
        return ImageProcessor(AutoImageProcessor.from_pretrained(source, backend="pil"))
    size = int(cfg.image_size or init.get("image_size", 224))
    return ImageProcessor(ViTImageProcessorPil(size={"height": size, "width": size}))


def load_processor(directory: str | Path) -> Processor:
    """Load a processor written by `save` (inside a checkpoint)."""
    directory = Path(directory)
    meta = json.loads(Path(directory, _META).read_text())
    if meta["kind"] == "text":
        return TextProcessor(AutoTokenizer.from_pretrained(directory), max_length=meta["max_length"])
    if meta["kind"] == "audio":
        extractor = AutoFeatureExtractor.from_pretrained(directory)
        return AudioProcessor(extractor, max_seconds=meta["max_seconds"], normalize=meta.get("normalize", "dataset"))
    return ImageProcessor(AutoImageProcessor.from_pretrained(directory, backend="pil"))
