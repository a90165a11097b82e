"""The MLflow model registry: a trial's checkpoint as the pyfunc model `cman`, and the `@champion` alias rule."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cman.metrics import VAL_METRIC

logger = logging.getLogger(__name__)

MODEL_NAME = "cman"
ALIAS = "champion"
SCORE_TAGS = ("test_rsum", VAL_METRIC)  # compared in this order when deciding whether a model beats the champion


def log_checkpoint(client: MlflowClient, run_id: str, checkpoint: Path) -> str:
    """Log `checkpoint` as the run's pyfunc model `model/` (jobs/mlflow_model.py), ready to register."""
    from jobs.mlflow_model import log_cman_model

    return log_cman_model(client, run_id, checkpoint, "model")


def champion(client: MlflowClient) -> Any | None:
    try:
        return client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:
        return None


def _score(tags: dict[str, str]) -> tuple[float, ...]:
    return tuple(float(tags.get(k, "-inf")) for k in SCORE_TAGS)


def register_best(client: MlflowClient, run_id: str, scores: dict[str, float]) -> dict[str, Any]:
    """Register `runs:/<run_id>/model` as a new version of `cman`; move `@champion` to it only if it scores higher.

    `scores` holds `test_rsum` (and `val_rsum`); they are stored as version tags, so the next sweep can compare.
    """
    tags = {k: f"{float(v):.6f}" for k, v in scores.items() if v is not None}
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):  # MLflow prints "Successfully registered ..."; ours is logged below
        version = mlflow.register_model(f"runs:/{run_id}/model", MODEL_NAME, tags=tags)
    for line in captured.getvalue().splitlines():  # anything else it printed (a warning) still reaches stderr
        if line.strip() and not line.startswith(("Successfully registered model", "Created version")):
            print(line, file=sys.stderr)
    current = champion(client)
    promoted = current is None or _score(tags) > _score(current.tags)
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, ALIAS, version.version)
        logger.info("model %s version %s is now @%s (%s)", MODEL_NAME, version.version, ALIAS, tags)
    else:
        logger.info(
            "model %s version %s registered; @%s stays on version %s (%s >= %s)",
            MODEL_NAME,
            version.version,
            ALIAS,
            current.version,
            dict(current.tags),
            tags,
        )
    return {
        "name": MODEL_NAME,
        "version": version.version,
        "promoted": promoted,
        "champion_version": version.version if promoted else current.version,
    }
