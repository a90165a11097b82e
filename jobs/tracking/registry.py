"""The MLflow model registry: a trial's checkpoint as a pyfunc model (`cman` by default), and the `@champion` rule."""

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
from jobs.tracking.lineage import DATASET_TAG, DIGEST_TAG, SPLIT_TAG

logger = logging.getLogger(__name__)

MODEL_NAME = "cman"
ALIAS = "champion"
SCORE_TAGS = ("test_rsum", VAL_METRIC)  # compared in this order when deciding whether a model beats the champion


def log_checkpoint(client: MlflowClient, run_id: str, checkpoint: Path) -> str:
    """Log `checkpoint` as the run's pyfunc model `model/` (jobs/mlflow_model.py), ready to register."""
    from jobs.mlflow_model import log_cman_model

    return log_cman_model(client, run_id, checkpoint, "model")


def champion(client: MlflowClient, name: str = MODEL_NAME, alias: str = ALIAS) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _score(tags: dict[str, str]) -> tuple[float, ...]:
    return tuple(float(tags.get(k, "-inf")) for k in SCORE_TAGS)


def _same_data(a: dict[str, str], b: dict[str, str]) -> bool:
    """Trained on the same data (manifest digest) and scored on the same split name."""
    return all(a.get(k) == b.get(k) for k in (DIGEST_TAG, SPLIT_TAG))


def model_name(client: MlflowClient, configured: str | None, lineage: dict[str, str], alias: str = ALIAS) -> str:
    """The registered model a new version goes to: `mlflow.registered_model` when set; else `cman` unless its
    @alias holds a model of other data, then `cman-<dataset>` (then `cman-<dataset>-<digest>`), so each dataset
    keeps its own champion."""
    if configured:
        return configured
    dataset = lineage.get(DATASET_TAG, "").split("/")[0] or "data"
    digest = lineage.get(DIGEST_TAG, "")[:8]
    candidates = [MODEL_NAME, f"{MODEL_NAME}-{dataset}", f"{MODEL_NAME}-{dataset}-{digest}"]
    for name in candidates:
        current = champion(client, name, alias)
        if current is None or _same_data(current.tags, lineage):
            return name
    return candidates[-1]


def register_best(
    client: MlflowClient,
    run_id: str,
    scores: dict[str, float],
    lineage: dict[str, str] | None = None,
    name: str | None = None,
    alias: str = ALIAS,
) -> dict[str, Any]:
    """Register `runs:/<run_id>/model` as a new version; move `@alias` to it only if it scores higher than the
    version holding it *and* was trained on the same data and scored on the same split (`lineage`: the
    `cman.dataset*` / `cman.eval_split` tags of `jobs.tracking.lineage`). A model of other data never displaces a
    champion: without `name` it goes to a name of its own (`model_name`), with one it is registered beside it.

    `scores` holds `test_rsum` (and `val_rsum`); they are stored as version tags with the lineage, so the next sweep
    can compare.
    """
    lineage = lineage or {}
    name = model_name(client, name, lineage, alias)
    tags = {**{k: f"{float(v):.6f}" for k, v in scores.items() if v is not None}, **lineage}
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):  # MLflow prints "Successfully registered ..."; ours is logged below
        version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags)
    for line in captured.getvalue().splitlines():  # anything else it printed (a warning) still reaches stderr
        if line.strip() and not line.startswith(("Successfully registered model", "Created version")):
            print(line, file=sys.stderr)
    current = champion(client, name, alias)
    comparable = current is None or _same_data(current.tags, tags)
    promoted = current is None or (comparable and _score(tags) > _score(current.tags))
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)
        logger.info("model %s version %s is now @%s (%s)", name, version.version, alias, tags)
    elif not comparable:
        logger.warning(
            "model %s version %s registered; @%s stays on version %s, which was trained on other data (%s, not %s)",
            name,
            version.version,
            alias,
            current.version,
            current.tags.get(DATASET_TAG, "unknown"),
            tags.get(DATASET_TAG, "unknown"),
        )
    else:
        logger.info(
            "model %s version %s registered; @%s stays on version %s (%s >= %s)",
            name,
            version.version,
            alias,
            current.version,
            dict(current.tags),
            tags,
        )
    return {
        "name": name,
        "alias": alias,
        "version": version.version,
        "promoted": promoted,
        "champion_version": version.version if promoted else current.version,
    }
