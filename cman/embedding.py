"""Embedding raw media with a CMAN model: `embed` (any subset of text / audio / image, composed) and `encode` (one
modality, sentence-transformers' keywords: `CMAN.encode_text / encode_audio / encode_image`).

Inputs are decoded a batch at a time, so a long list of files never sits in memory decoded all at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cman.modality import ALL_MODALITIES, Modality

if TYPE_CHECKING:
    import torch

    from cman.models.cman import CMAN


def _is_batch(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _load_audio(processor: Any, value: Any, sample_rate: int | None, where: str, item_id: str | None) -> np.ndarray:
    if isinstance(value, str | Path | bytes):
        return processor.load(value if isinstance(value, bytes) else str(value), item_id=item_id)
    wave = np.asarray(value, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"{where}: a waveform must be a 1-D mono float array, got shape {wave.shape}")
    if sample_rate is None:
        raise ValueError(f"{where}: a waveform needs its sample_rate= (e.g. embed(audio=wave, sample_rate=16000))")
    if not np.isfinite(wave).all() or wave.size == 0:
        raise ValueError(f"{where}: the waveform is empty or holds NaN/inf")
    if int(sample_rate) != processor.sampling_rate:
        import soxr

        wave = soxr.resample(wave, int(sample_rate), processor.sampling_rate).astype(np.float32)
    return np.ascontiguousarray(wave[: int(processor.max_seconds * processor.sampling_rate)])


def _load_image(processor: Any, value: Any, where: str, item_id: str | None) -> Any:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, str | Path | bytes):
        return processor.load(value if isinstance(value, bytes) else str(value), item_id=item_id)
    raise ValueError(f"{where}: expected a path, bytes or a PIL image, got {type(value).__name__}")


def _load(model: CMAN, modality: Modality, value: Any, sample_rate: int | None, where: str) -> Any:
    processor = model.processors[modality]
    item_id = where if "[" in where else None  # a batch row is named in decoding errors: "(item image[2])"
    if modality == Modality.AUDIO:
        return _load_audio(processor, value, sample_rate, where, item_id)
    if modality == Modality.IMAGE:
        return _load_image(processor, value, where, item_id)
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return processor.load(value, item_id=item_id)


def _rows(model: CMAN, given: dict[Modality, Any]) -> tuple[dict[Modality, list[Any]], bool]:
    """Each given modality as a list of rows (same length each) and whether the input was a batch."""
    missing = [m.value for m in given if m not in model.modalities]
    if missing:
        have = [m.value for m in model.modalities]
        raise ValueError(f"this model has no {', '.join(missing)} encoder (it has {have})")
    kinds = {m: _is_batch(v) for m, v in given.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError("pass either one value per modality or a list per modality (a batch), not a mix")
    batch = next(iter(kinds.values()))
    rows = {m: list(v) if batch else [v] for m, v in given.items()}
    sizes = {m.value: len(r) for m, r in rows.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"every modality needs one entry per query row; got lengths {sizes}")
    return rows, batch


def _run(
    model: CMAN,
    rows: dict[Modality, list[Any]],
    *,
    batch: bool,
    sample_rate: int | None = None,
    batch_size: int = 32,
    device: Any = None,
    progress: bool = False,
) -> np.ndarray:
    """Composed embeddings of `rows` (row i composes entry i of each modality), decoded and embedded `batch_size` rows
    at a time on `device` (default: where the model is; given, the model moves there). # (n, dim), unnormalised"""
    import torch
    from tqdm import tqdm

    n = len(next(iter(rows.values())))
    dim = model.config.model.embedding_dim
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    step = max(1, int(batch_size))
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, step), desc="embedding", unit="batch", disable=not progress):
                features = {}
                for m, values in rows.items():
                    proc = model.processors[m]
                    chunk = range(start, min(n, start + step))
                    names = [f"{m.value}[{i}]" if batch else m.value for i in chunk]
                    raw = [_load(model, m, values[i], sample_rate, name) for i, name in zip(chunk, names, strict=True)]
                    collated = proc.collate([proc.features(v) for v in raw])
                    features[m] = {k: t.to(device) for k, t in collated.items()}
                chunks.append(model.embed_features(features).float().cpu().numpy())  # (chunk, dim)
    finally:
        model.train(was_training)
    return np.concatenate(chunks)  # (n, dim)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def embed(
    model: CMAN,
    text: str | Sequence[str] | None = None,
    audio: Any = None,
    image: Any = None,
    *,
    sample_rate: int | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """L2-normalised embedding(s) of any non-empty subset of text / audio / image (a composed query if several).

    text: a string; audio: a path, encoded bytes (WAV/FLAC/OGG/MP3) or a 1-D float waveform with `sample_rate`;
    image: a path, encoded bytes or a PIL image. Lists of those embed a batch (row i composes entry i of each
    list) → (n, dim); single values → (dim,).
    """
    given = {m: v for m, v in zip(ALL_MODALITIES, (text, audio, image), strict=True) if v is not None}
    if not given:
        raise ValueError("embed() needs at least one of text=, audio=, image=")
    rows, batch = _rows(model, given)
    out = _normalised(_run(model, rows, batch=batch, sample_rate=sample_rate, batch_size=batch_size))
    return out if batch else out[0]


def encode(
    model: CMAN,
    modality: Modality | str,
    inputs: Any,
    *,
    batch_size: int = 32,
    normalize_embeddings: bool = True,
    convert_to_tensor: bool = False,
    show_progress_bar: bool = False,
    device: str | torch.device | None = None,
    sample_rate: int | None = None,
) -> np.ndarray | torch.Tensor:
    """One modality's embeddings, with sentence-transformers' keywords: a single input → (dim,), a list → (n, dim);
    numpy, or a torch tensor on the model's device with `convert_to_tensor`. `device` moves the model there (as
    sentence-transformers does). CMAN's fusion head L2-normalises every embedding already, so
    `normalize_embeddings=False` returns the same vectors. `sample_rate`: of raw waveforms (audio only).
    """
    modality = Modality(modality)
    rows, batch = _rows(model, {modality: inputs})
    kwargs = {"sample_rate": sample_rate, "batch_size": batch_size, "device": device, "progress": show_progress_bar}
    out = _run(model, rows, batch=batch, **kwargs)
    if normalize_embeddings:
        out = _normalised(out)
    out = out if batch else out[0]
    if convert_to_tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(out)).to(next(model.parameters()).device)
    return out
