"""Training-time audio and image augmentation on the processed features (after the feature cache: it stays valid).

Spectrogram features (AST fbank, (frames, mel_bins)) get, in this order, each only when its setting is non-zero:

- tempo: the real frames are resampled in time by a factor in [1 - tempo, 1 + tempo] (speed perturbation);
- freq_warp: the mel axis is stretched by a factor in [1 - freq_warp, 1 + freq_warp] (vocal-tract-length
  perturbation: a different speaker's formants sit at proportionally shifted frequencies);
- gain: a constant in [-gain, gain] is added (log-mel domain: a loudness change);
- noise: Gaussian noise of this standard deviation on the real frames;
- shift_frames: the utterance starts up to this many frames later (the padding moves in front of it);
- SpecAugment masks: `time_masks` bands of up to `time_mask_width` frames and `freq_masks` bands of up to
  `freq_mask_width` mel bins are set to the padding value (Park et al., 2019).

Waveform features ((samples,), HuBERT / wav2vec2) get tempo, gain (a factor 10^(±gain/20)), noise and shift.

Image features ((3, H, W) normalised pixels) get, each only when its setting is non-zero:

- shift_pixels: a translation by up to this many pixels along each axis (the border pixels are repeated into the
  uncovered edge; keep it below the distance that changes what a caption says about where things are);
- brightness: the pixels (normalised, so around the mean) are scaled by a factor in [1 - brightness, 1 + brightness];
- noise: Gaussian noise of this standard deviation.

Random numbers come from torch's global generator, which training seeds per epoch (`train_one_epoch`), so runs with
augmentation are seeded; with augmentation off nothing draws from it and training stays bit-reproducible. Only the
training loader augments; validation, test, indexing and serving never do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from cman.modality import Modality

Features = dict[str, torch.Tensor]


def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()))


def real_length(values: torch.Tensor) -> int:
    """Frames before the padding: trailing frames identical to the last one are padding (AST pads with a constant)."""
    frames = values.shape[0]
    same = (values == values[-1]).all(dim=1)  # (frames,)
    if not bool(same[:-1].any()):
        return frames
    run = int(torch.flip(same, [0]).int().cumprod(0).sum())  # trailing frames equal to the last one
    return max(1, frames - run)


class AudioAugment:
    """Callable on one item's audio features; returns new tensors (cached features are never modified)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def __call__(self, features: Features) -> Features:
        if "input_values" not in features:
            raise ValueError(
                f"data.audio_augment works on AST fbank or waveform features, not this audio encoder's "
                f"{sorted(features)} (e.g. Whisper's log-mel): set data.audio_augment.enabled to false"
            )
        values = features["input_values"]
        out = dict(features)
        out["input_values"] = self._spectrogram(values) if values.ndim == 2 else self._waveform(values)
        return out

    # ---- (frames, mel_bins) --------------------------------------------------------------------------------------
    def _spectrogram(self, values: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        frames, bins = values.shape
        length = real_length(values)
        pad = values[-1].clone() if length < frames else torch.zeros(bins, dtype=values.dtype)
        x = values[:length]  # (length, bins)
        if c.tempo > 0:
            new_length = max(1, min(frames, round(length / _uniform(1 - c.tempo, 1 + c.tempo))))
            x = F.interpolate(x.T[None], size=new_length, mode="linear", align_corners=True)[0].T
        if c.freq_warp > 0:
            x = _warp_bins(x, _uniform(1 - c.freq_warp, 1 + c.freq_warp))
        if c.gain > 0:
            x = x + _uniform(-c.gain, c.gain)
        if c.noise > 0:
            x = x + c.noise * torch.randn_like(x)
        length = x.shape[0]
        start = 0
        if c.shift_frames > 0 and frames > length:
            start = int(torch.randint(0, min(c.shift_frames, frames - length) + 1, ()))
        result = pad.expand(frames, bins).clone()
        result[start : start + length] = x
        for _ in range(c.time_masks):
            _mask(result, 0, start, length, c.time_mask_width, pad)
        for _ in range(c.freq_masks):
            _mask(result, 1, 0, bins, c.freq_mask_width, pad)
        return result.to(values.dtype)

    # ---- (samples,) ----------------------------------------------------------------------------------------------
    def _waveform(self, values: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x = values
        if c.tempo > 0:
            size = max(1, round(x.shape[0] / _uniform(1 - c.tempo, 1 + c.tempo)))
            x = F.interpolate(x[None, None], size=size, mode="linear", align_corners=True)[0, 0]
        if c.gain > 0:
            x = x * 10 ** (_uniform(-c.gain, c.gain) / 20)
        if c.noise > 0:
            x = x + c.noise * torch.randn_like(x)
        if c.shift_frames > 0:
            x = F.pad(x, (int(torch.randint(0, c.shift_frames * 160 + 1, ())), 0))  # 10 ms frames at 16 kHz
        return x.to(values.dtype)


class ImageAugment:
    """Callable on one item's image features; returns new tensors (cached features are never modified)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def __call__(self, features: Features) -> Features:
        c = self.cfg
        x = features["pixel_values"]  # (3, H, W)
        if c.shift_pixels > 0:
            s = c.shift_pixels
            dx, dy = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            height, width = x.shape[-2:]
            padded = F.pad(x[None], (s, s, s, s), mode="replicate")[0]
            x = padded[:, s - dy : s - dy + height, s - dx : s - dx + width]
        if c.brightness > 0:
            x = x * _uniform(1 - c.brightness, 1 + c.brightness)
        if c.noise > 0:
            x = x + c.noise * torch.randn_like(x)
        return {**features, "pixel_values": x.contiguous()}


def _warp_bins(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Read bin f from position f / factor (linear interpolation, clamped): factor > 1 moves energy up."""
    bins = x.shape[1]
    pos = (torch.arange(bins, dtype=torch.float32) / factor).clamp(0, bins - 1)
    low = pos.floor().long()
    high = (low + 1).clamp(max=bins - 1)
    frac = (pos - low.float()).to(x.dtype)
    return x[:, low] * (1 - frac) + x[:, high] * frac


def _mask(x: torch.Tensor, axis: int, start: int, extent: int, max_width: int, pad: torch.Tensor) -> None:
    if max_width <= 0 or extent <= 0:
        return
    width = int(torch.randint(0, min(max_width, extent) + 1, ()))
    if width == 0:
        return
    begin = start + int(torch.randint(0, extent - width + 1, ()))
    if axis == 0:
        x[begin : begin + width] = pad
    else:
        x[:, begin : begin + width] = pad[begin : begin + width]


class ItemAugment:
    """Applies per-modality augmenters to a dataset row's features (a new dict; the input row is untouched)."""

    def __init__(self, augmenters: dict[Modality, Any]) -> None:
        self.augmenters = augmenters

    def __call__(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        features = dict(row["features"])
        for modality, fn in self.augmenters.items():
            if modality in features:
                features[modality] = fn(features[modality])
        return {**row, "features": features}


def build_augment(config: Any, modalities: list[Modality]) -> ItemAugment | None:
    """The training augmentation of `config.data.audio_augment` / `image_augment`, or None when none applies."""
    augmenters: dict[Modality, Any] = {}
    if config.data.audio_augment.enabled and Modality.AUDIO in modalities:
        augmenters[Modality.AUDIO] = AudioAugment(config.data.audio_augment)
    if config.data.image_augment.enabled and Modality.IMAGE in modalities:
        augmenters[Modality.IMAGE] = ImageAugment(config.data.image_augment)
    return ItemAugment(augmenters) if augmenters else None


__all__ = ["AudioAugment", "ImageAugment", "ItemAugment", "build_augment", "real_length"]
