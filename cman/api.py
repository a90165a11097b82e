"""The user-facing Python API: embed raw media (`cman.embedding`), galleries in-process (`cman.gallery`), resolve
checkpoints and MLflow URIs, find bundled configs.

    from cman import CMAN, Gallery
    model = CMAN.from_pretrained("outputs/quickstart/best")          # or "models:/cman@champion"
    query = model.encode_text("a large red circle on the left")      # (512,) L2-normalised numpy
    hits = Gallery.load("outputs/quickstart/index").search(query, target="image", k=5)

Nothing here imports Ray, MLflow or FastAPI at import time; MLflow is imported only to resolve an MLflow URI.
"""

from __future__ import annotations

import re
from pathlib import Path

from cman.embedding import embed, encode
from cman.gallery import Gallery

__all__ = ["Gallery", "bundled_config", "embed", "encode", "find_checkpoint", "is_model_uri", "resolve_checkpoint"]

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
