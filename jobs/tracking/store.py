"""Where MLflow data goes: the tracking URI, experiments, MLflow-safe metric names."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")


def tracking_uri(config_uri: str | None, output_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else `config_uri` (`config.mlflow.tracking_uri`), else sqlite under `output_dir`.

    sqlite paths are made absolute: Tune chdirs into trial folders, so a relative store would split per trial.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if not uri:
        return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare path: a sqlite file
        return f"sqlite:///{Path(uri).resolve()}"
    return uri


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """Experiment id of `name` (restored if deleted), created if missing.

    A new experiment keeps its artifacts under `artifact_root` (absolute; a sqlite store needs one), or where the
    tracking server decides when `artifact_root` is None.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    if artifact_root is None:
        return client.create_experiment(name)
    artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def metric_name(name: str) -> str:
    """MLflow-safe metric/param name: `val_text->image_R@1` → `val_text_to_image_R_at_1`."""
    return _BAD_NAME_CHARS.sub("_", name.replace("->", "_to_").replace("@", "_at_"))


def numeric_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of `values` (bools and non-numbers dropped) under MLflow-safe names."""
    return {
        metric_name(k): float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
