"""Encoder deployments: one per modality, each loading only its own encoder and processor from a checkpoint.

A request payload (caption text, or raw audio / image bytes) is decoded and preprocessed inside the replica with
the serving limits (bounded memory), batched with concurrent requests by `@serve.batch`, and returned as
fusion-width tokens + mask (numpy) for the Retriever. A bad item is an error value, so it fails only its request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
from ray import serve

from cman.config import ServeConfig
from cman.data.errors import DataError, LimitError
from cman.modality import Modality
from cman.precision import dtype_name, resolve_dtype
from cman.quantize import int8_linear_count, quantize_linear
from cman.steps import autocast

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.01


def inference_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def limit_threads(num_cpus: float) -> None:
    """Fractional-CPU replicas share cores: one torch thread each unless they reserve more."""
    torch.set_num_threads(max(1, math.floor(num_cpus)))


def min_audio_samples(backbone: torch.nn.Module) -> int | None:
    """The shortest waveform a wav2vec2/HuBERT conv stack accepts (None for spectrogram encoders)."""
    from cman.data.audio import min_input_samples

    config = getattr(backbone, "config", None)
    kernel, stride = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    return min_input_samples(kernel, stride) if kernel and stride else None


def _health_input(modality: Modality, sampling_rate: int) -> Any:
    if modality == Modality.TEXT:
        return "health check"
    if modality == Modality.AUDIO:
        t = np.arange(sampling_rate) / sampling_rate  # one second
        return (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # (samples,)
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128))


class ModalityEncoderServer:
    """Holds `model.encoders[m]` + `model.processors[m]` (LoRA merged) and nothing else of the model."""

    def __init__(self, checkpoint: str, modality: str, settings: ServeConfig | None = None) -> None:
        from cman.models.cman import CMAN, count_parameters

        self.settings = settings or ServeConfig()
        limit_threads(self.settings.num_cpus_per_replica)
        self.modality = Modality(modality)
        model = CMAN.from_pretrained(checkpoint, modalities=[self.modality]).merge_adapters()
        self.device = inference_device(self.settings.num_gpus_per_replica)
        self.encoder = model.encoders[self.modality.value].to(self.device).eval()
        self.parameters = count_parameters(self.encoder)[1]  # before quantizing: packed int8 weights are no Parameters
        self.quantize = self.settings.quantize
        quantize_linear(self.encoder, self.quantize, purpose="serving")
        # int8 Linear layers take fp32 activations (ServeConfig rejects quantize int8 with dtype bf16)
        self.dtype = (
            resolve_dtype(self.device, self.settings.dtype, purpose="serving") if self.quantize == "none" else None
        )
        self.processor = model.processors[self.modality]
        del model
        self.min_samples = min_audio_samples(self.encoder.backbone) if self.modality == Modality.AUDIO else None
        self.encode.set_max_batch_size(self.settings.max_batch_size)
        self.encode.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        logger.info(
            "%s encoder ready on %s (%d parameters, %s)",
            self.modality.value,
            self.device,
            self.parameters,
            self.numerics,
        )

    def _load(self, payload: Any) -> Any:
        """Decode one payload with the serving limits (bounded memory; LimitError past a limit)."""
        s = self.settings
        if self.modality == Modality.TEXT:
            from cman.data.text import clean_caption

            return clean_caption(payload, max_chars=s.max_text_chars)
        if self.modality == Modality.AUDIO:
            from cman.data.audio import decode_audio

            if isinstance(payload, np.ndarray):
                return payload
            proc = self.processor
            return decode_audio(
                payload,
                proc.sampling_rate,
                max_seconds=proc.max_seconds,
                max_duration_s=s.max_audio_seconds,
                min_samples=self.min_samples,
            )
        from cman.data.image import UPLOAD_FORMATS, decode_image

        return (
            payload
            if not isinstance(payload, bytes | str)
            else decode_image(
                payload, max_pixels=s.max_image_pixels, formats=UPLOAD_FORMATS if isinstance(payload, bytes) else None
            )
        )

    def _features(self, payload: Any) -> dict[str, Any]:
        bad_media = 415 if self.modality != Modality.TEXT else 400
        try:
            return self.processor.features(self._load(payload))
        except LimitError as err:
            return {"error": str(err), "status": 413}
        except DataError as err:
            return {"error": str(err), "status": bad_media}
        except Exception as err:  # noqa: BLE001 - odd media must fail this request only, not the batch
            logger.warning("%s input could not be preprocessed: %r", self.modality.value, err)
            message = f"{self.modality.value} input could not be preprocessed ({type(err).__name__})"
            return {"error": message, "status": bad_media}

    @torch.no_grad()
    def _run(self, features: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
        batch = {k: v.to(self.device) for k, v in self.processor.collate(features).items()}
        with autocast(self.device, self.dtype):
            tokens, mask = self.encoder(batch)  # (batch, seq, width), (batch, seq)
        tokens, mask = tokens.float().cpu().numpy(), mask.cpu().numpy()
        out = []
        for row_tokens, row_mask in zip(tokens, mask, strict=True):
            length = int(np.flatnonzero(row_mask).max()) + 1 if row_mask.any() else 1
            out.append({"tokens": row_tokens[:length], "mask": row_mask[:length]})  # (seq, width), (seq,)
        return out

    def _encode_batch(self, payloads: list[Any]) -> list[dict[str, Any]]:
        """Per payload: {"tokens": (seq, width) float32, "mask": (seq,) bool}, or {"error", "status"}."""
        self.batch_sizes[len(payloads)] += 1
        features = [self._features(p) for p in payloads]
        good = [i for i, f in enumerate(features) if "error" not in f]
        results: list[dict[str, Any]] = list(features)
        if good:
            for i, row in zip(good, self._run([features[i] for i in good]), strict=True):
                results[i] = row
        return results

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def encode(self, payloads: list[Any]) -> list[dict[str, Any]]:
        """One payload per request, batched with concurrent requests: see `_encode_batch`."""
        return self._encode_batch(payloads)

    async def encode_many(self, payloads: list[Any]) -> list[dict[str, Any]]:
        """A list of payloads sent in one call (a /v1 batch), answered in order: run in batches of max_batch_size,
        letting the replica's other requests in between them."""
        out: list[dict[str, Any]] = []
        size = self.settings.max_batch_size
        for start in range(0, len(payloads), size):
            out.extend(self._encode_batch(payloads[start : start + size]))
            await asyncio.sleep(0)
        return out

    def check_health(self) -> None:
        """Serve calls this periodically: a tiny forward through the encoder must produce finite tokens."""
        sampling_rate = getattr(self.processor, "sampling_rate", 16000)
        features = self._features(_health_input(self.modality, sampling_rate))
        if "error" in features:
            raise RuntimeError(f"{self.modality.value} encoder cannot preprocess its health input: {features['error']}")
        tokens = self._run([features])[0]["tokens"]
        if not np.isfinite(tokens).all():
            raise RuntimeError(f"{self.modality.value} encoder produced non-finite tokens")

    @property
    def numerics(self) -> str:
        """How this replica computes: "int8 Linear layers (N), fp32 elsewhere" or "fp32" / "bf16" autocast."""
        if self.quantize == "int8":
            return f"int8 Linear layers ({int8_linear_count(self.encoder)}), fp32 elsewhere"
        return dtype_name(self.dtype)

    def info(self) -> dict[str, Any]:
        """This replica: process id, modality, the parameter count it holds and how it computes (for tests and
        operators)."""
        return {
            "pid": os.getpid(),
            "modality": self.modality.value,
            "parameters": self.parameters,
            "quantize": self.quantize,
            "dtype": dtype_name(self.dtype),
            "numerics": self.numerics,
        }

    def stats(self) -> dict[str, Any]:
        sizes = dict(sorted(self.batch_sizes.items()))
        return {
            "batches": sum(sizes.values()),
            "requests": sum(size * n for size, n in sizes.items()),
            "max_batch_size_seen": max(sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sizes.items()},
        }

    def reset_stats(self) -> None:
        self.batch_sizes.clear()


EncoderDeployment = serve.deployment(ModalityEncoderServer)
DEPLOYMENT_NAMES = {Modality.TEXT: "TextEncoder", Modality.AUDIO: "AudioEncoder", Modality.IMAGE: "ImageEncoder"}
