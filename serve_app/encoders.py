"""Encoder deployments: one per modality, each holding only its own encoder and processor from a checkpoint.

A request payload (caption text, or raw audio / image bytes) is decoded and preprocessed inside the replica, batched
with concurrent requests by `@serve.batch`, and returned as fusion-width tokens + mask (numpy) for the Retriever.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import torch
from ray import serve

from cman.data.errors import DataError
from cman.modality import Modality

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.01


def inference_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def limit_threads(num_cpus: float) -> None:
    """Fractional-CPU replicas share cores: one torch thread each unless they reserve more."""
    torch.set_num_threads(max(1, math.floor(num_cpus)))


class ModalityEncoderServer:
    """Holds `model.encoders[m]` + `model.processors[m]` (LoRA merged); everything else of the model is dropped."""

    def __init__(
        self,
        checkpoint: str,
        modality: str,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        from cman.models.cman import CMAN

        limit_threads(num_cpus)
        self.modality = Modality(modality)
        model = CMAN.from_pretrained(checkpoint).merge_adapters()
        if self.modality not in model.modalities:
            raise ValueError(f"checkpoint {checkpoint} has no {self.modality.value} encoder")
        self.device = inference_device(num_gpus)
        self.encoder = model.encoders[self.modality.value].to(self.device).eval()
        self.processor = model.processors[self.modality]
        del model
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        logger.info("%s encoder ready on %s (max_batch_size=%d)", self.modality.value, self.device, max_batch_size)

    def _features(self, payload: Any) -> dict[str, torch.Tensor] | dict[str, Any]:
        try:
            return self.processor.features(self.processor.load(payload))
        except DataError as err:
            return {"error": str(err), "status": 415 if self.modality != Modality.TEXT else 400}
        except Exception as err:  # noqa: BLE001 - odd media must fail this request only, not the batch
            logger.warning("%s input could not be preprocessed: %r", self.modality.value, err)
            return {
                "error": f"{self.modality.value} input could not be preprocessed ({type(err).__name__}: {err})",
                "status": 415 if self.modality != Modality.TEXT else 400,
            }

    @torch.no_grad()
    def _run(self, features: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
        batch = {k: v.to(self.device) for k, v in self.processor.collate(features).items()}
        tokens, mask = self.encoder(batch)  # (batch, seq, width), (batch, seq)
        tokens, mask = tokens.float().cpu().numpy(), mask.cpu().numpy()
        out = []
        for row_tokens, row_mask in zip(tokens, mask, strict=True):
            length = int(np.flatnonzero(row_mask).max()) + 1 if row_mask.any() else 1
            out.append({"tokens": row_tokens[:length], "mask": row_mask[:length]})  # (seq, width), (seq,)
        return out

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def encode(self, payloads: list[Any]) -> list[dict[str, Any]]:
        """Per request: {"tokens": (seq, width) float32, "mask": (seq,) bool}, or {"error", "status"}."""
        self.batch_sizes[len(payloads)] += 1
        features = [self._features(p) for p in payloads]
        good = [i for i, f in enumerate(features) if "error" not in f]
        results: list[dict[str, Any]] = list(features)
        if good:
            for i, row in zip(good, self._run([features[i] for i in good]), strict=True):
                results[i] = row
        return results

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
