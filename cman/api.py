"""The user-facing Python API: embed raw media, search a gallery in-process, resolve checkpoints and MLflow URIs.

    from cman import CMAN, Gallery
    model = CMAN.from_pretrained("outputs/quickstart/best")          # or "models:/cman@champion"
    query = model.embed(text="a large red circle on the left")       # (512,) L2-normalised numpy
    hits = Gallery.load("outputs/quickstart/index").search(query, target="image", k=5)

Nothing here imports Ray, MLflow or FastAPI at import time; MLflow is imported only to resolve an MLflow URI.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cman.modality import ALL_MODALITIES, Modality

if TYPE_CHECKING:
    from cman.index import GalleryIndex
    from cman.models.cman import CMAN

CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc model's artifact key (jobs/mlflow_model.py)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:/")  # models:/..., runs:/..., s3://..., mlflow-artifacts:/...


# ---- bundled configs ------------------------------------------------------------------------------------------------
def bundled_config(name: str) -> Path:
    """A config shipped with CMAN (`demo`, `default`, `minimal`, `digits`, with or without `.yaml`).

    In a source checkout it is the repository's `configs/` file; in an installed wheel the package data
    `cman.configs` (found with importlib.resources).
    """
    from importlib import resources

    filename = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "configs" / filename).is_file():
        return repo / "configs" / filename
    try:
        package = resources.files("cman.configs")
    except ModuleNotFoundError:
        package = None
    if package is None or not (package / filename).is_file():
        known = sorted(p.name for p in package.iterdir() if p.name.endswith(".yaml")) if package else []
        raise FileNotFoundError(f"no config {name!r} is bundled with cman (bundled: {known})")
    return Path(str(package / filename))


# ---- checkpoints and MLflow model URIs -----------------------------------------------------------------------------
def is_model_uri(source: str | Path) -> bool:
    """True for an MLflow / remote URI (`models:/cman@champion`, `runs:/<id>/model`, `s3://...`), not a local path."""
    return isinstance(source, str) and bool(_URI.match(source)) and not source.startswith("file:")


def resolve_checkpoint(source: str | Path, tracking_uri: str | None = None) -> Path:
    """A local CMAN checkpoint directory for `source`.

    `source` is a checkpoint directory, an MLflow model directory holding one (as `log_cman_model` writes it), or
    an MLflow URI (`models:/cman@champion`, `runs:/<run_id>/model`, any artifact URI), which is downloaded first
    from `tracking_uri` (default: `MLFLOW_TRACKING_URI`).
    """
    if isinstance(source, str) and source.startswith("file://"):
        source = source.removeprefix("file://")
    if is_model_uri(source):
        try:
            import mlflow
        except ImportError as err:
            raise ImportError(f"loading {source} needs MLflow: pip install 'cman[ray]' (or mlflow)") from err
        kwargs = {"tracking_uri": tracking_uri} if tracking_uri else {}
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(source), **kwargs))
        except Exception as err:  # noqa: BLE001 - MLflow raises several types; one clear message
            store = tracking_uri or mlflow.get_tracking_uri()
            raise FileNotFoundError(
                f"MLflow model {source} could not be downloaded from {store} ({type(err).__name__}: {err}); "
                "set MLFLOW_TRACKING_URI to the store that holds it"
            ) from None
        return find_checkpoint(local, what=f"MLflow model {source}")
    return find_checkpoint(Path(source))


def find_checkpoint(path: Path, what: str | None = None) -> Path:
    """`path` itself if it is a checkpoint, else the checkpoint inside an MLflow model directory at `path`."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    if (path / "MLmodel").is_file():
        for meta in sorted((path / "artifacts").rglob("metadata.json")):
            if _is_checkpoint(meta.parent):
                return meta.parent
    where = what or str(path)
    raise FileNotFoundError(
        f"{where} is not a CMAN checkpoint (no metadata.json / config.yaml) nor an MLflow model holding one"
    )


def _is_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file() and (path / "config.yaml").is_file()


# ---- embedding raw media ---------------------------------------------------------------------------------------------
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

    text: a string; audio: a path, encoded bytes (WAV/FLAC/OGG) or a 1-D float waveform with `sample_rate`;
    image: a path, encoded bytes or a PIL image. Lists of those embed a batch (row i composes entry i of each
    list) → (n, dim); single values → (dim,).
    """
    import torch

    given = {m: v for m, v in zip(ALL_MODALITIES, (text, audio, image), strict=True) if v is not None}
    if not given:
        raise ValueError("embed() needs at least one of text=, audio=, image=")
    rows, batch = _rows(model, given)
    n = len(next(iter(rows.values())))
    dim = model.config.model.embedding_dim
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    raw = {
        m: [_load(model, m, v, sample_rate, f"{m.value}[{i}]" if batch else m.value) for i, v in enumerate(values)]
        for m, values in rows.items()
    }
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, n, max(1, int(batch_size))):
                features = {}
                for m, values in raw.items():
                    proc = model.processors[m]
                    collated = proc.collate([proc.features(v) for v in values[start : start + batch_size]])
                    features[m] = {k: t.to(device) for k, t in collated.items()}
                chunks.append(model.embed_features(features).float().cpu().numpy())  # (chunk, dim)
    finally:
        model.train(was_training)
    out = np.concatenate(chunks)  # (n, dim)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out if batch else out[0]


# ---- in-process gallery search -------------------------------------------------------------------------------------
class Gallery:
    """The gallery of an index directory (`cman index --out DIR`: its store DIR/gallery.db), searched in-process.

    `search` returns what the HTTP service's `/search` returns in `results` (id, score, caption), with local media
    paths (`image_path`, `audio_path`) in place of URLs.
    """

    def __init__(self, indexes: dict[str, GalleryIndex], directory: str | Path | None = None) -> None:
        self.indexes = dict(indexes)
        self.directory = Path(directory) if directory is not None else None

    @classmethod
    def load(cls, directory: str | Path) -> Gallery:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"index directory {directory} not found; build it with `cman index --out DIR`")
        from cman.gallery_mirror import open_gallery  # the gallery store, as a Retriever replica loads it

        indexes = {m.value: index for m, index in open_gallery(directory).items()}
        if not indexes:
            names = ", ".join(m.value for m in ALL_MODALITIES)
            raise FileNotFoundError(f"{directory} holds a gallery without {names} vectors; build it with `cman index`")
        return cls(indexes, directory)

    @property
    def targets(self) -> list[str]:
        return list(self.indexes)

    def __len__(self) -> int:
        return sum(len(index) for index in self.indexes.values())

    def search(self, query_embedding: np.ndarray, target: str | Modality, k: int = 10) -> list[Any]:
        """Top-`k` items of the `target` gallery, best first; a (n, dim) query gives one list per row."""
        target = target.value if isinstance(target, Modality) else str(target)
        if target not in self.indexes:
            raise ValueError(f"unknown target {target!r}: this gallery has {self.targets}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        query = np.asarray(query_embedding, dtype=np.float32)
        hits = self.indexes[target].search(query, int(k))
        rows = [[self._result(item, score) for item, score in row] for row in hits]
        return rows if query.ndim == 2 else rows[0]

    def _result(self, item: dict[str, Any], score: float) -> dict[str, Any]:
        out: dict[str, Any] = {"id": item["id"], "score": float(score)}
        if item.get("caption"):
            out["caption"] = item["caption"]
        for kind in ("image_path", "audio_path"):
            if item.get(kind):
                path = Path(item[kind])
                if not path.is_absolute() and self.directory is not None:
                    path = self.directory / path
                out[kind] = str(path)
        return out
