"""Where a run's model comes from: the training data (MLflow dataset input, its manifest's hash) and the git commit.

The dataset's identity — `<dataset name>/<split>` and the SHA-256 of that split's metadata file — is logged as an
MLflow dataset input of every training run and trial run, and tagged on every registered model version, so that
the registry compares a new model only with models trained on the same data (`jobs.tracking.registry`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag

from cman.config import CMANConfig

logger = logging.getLogger(__name__)

DATASET_TAG, DIGEST_TAG, SPLIT_TAG = "cman.dataset", "cman.dataset_digest", "cman.eval_split"
GIT_TAG = "mlflow.source.git.commit"


@dataclass(frozen=True)
class DatasetIdentity:
    name: str  # `<dataset name>/<split>`, e.g. `demo/train` (`dataset_name`)
    digest: str  # the first 16 hex digits of the SHA-256 of the split's metadata file
    uri: str  # where the metadata file is


def dataset_identity(config: CMANConfig, split: str | None = None) -> DatasetIdentity:
    """The identity of `config`'s training split (or `split`); a root that cannot be read hashes its path."""
    split = split or config.data.train_split
    root = str(config.data.root or "")
    manifest = Path(root) / "metadata" / f"{split}_metadata.json"
    try:
        content = manifest.read_bytes()
        uri = manifest.resolve().as_uri()
    except OSError:
        logger.warning("cannot read %s: the dataset is identified by its path only", manifest)
        content, uri = root.encode(), root
    return DatasetIdentity(f"{dataset_name(root)}/{split}", hashlib.sha256(content).hexdigest()[:16], uri)


def dataset_name(root: str) -> str:
    """A dataset's short name: `name` in its dataset.json, else the last part of the `generator` that wrote it
    (`cman.data.demo` -> `demo`, `cman.data.importers.coco` -> `coco`), else the folder's name."""
    try:
        info = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        info = {}
    if isinstance(info, dict) and isinstance(info.get("name") or info.get("generator"), str):
        return str(info.get("name") or info["generator"].rsplit(".", 1)[-1])
    return Path(root.rstrip("/")).name or root


def lineage_tags(config: CMANConfig, split: str) -> dict[str, str]:
    """What the registry compares champions by: the training data's identity and the split the score is on."""
    identity = dataset_identity(config)
    return {DATASET_TAG: identity.name, DIGEST_TAG: identity.digest, SPLIT_TAG: split}


def log_dataset(client: MlflowClient, run_id: str, config: CMANConfig) -> DatasetIdentity:
    """Log the training split as the run's MLflow dataset input (context `training`); returns its identity."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    identity = dataset_identity(config)
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": the local-file source is meant
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(identity.uri)
        dataset = MetaDataset(source, name=identity.name, digest=identity.digest)._to_mlflow_entity()
        client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
    except Exception as err:  # noqa: BLE001 - lineage must never fail a training run
        logger.warning("could not log the dataset input of run %s: %s", run_id, err)
    client.set_tag(run_id, DATASET_TAG, identity.name)
    client.set_tag(run_id, DIGEST_TAG, identity.digest)
    commit = git_commit()
    if commit:
        client.set_tag(run_id, GIT_TAG, commit)
    return identity


@functools.cache
def git_commit() -> str | None:
    """The commit of the CMAN checkout this runs from (`+dirty` when it has uncommitted changes); None outside git."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
