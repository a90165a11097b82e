"""CMAN as an MLflow pyfunc model: `mlflow.pyfunc.load_model(...).predict(df)` and `mlflow models serve` work on it.

`log_cman_model(client, run_id, checkpoint)` writes `runs:/<run_id>/model`: the checkpoint as the artifact
`checkpoint`, this file as the model code (MLflow "models from code", so nothing is pickled), the `cman` package as
code, a signature, an input example and pinned requirements.

Input: a DataFrame (or records / dict of columns) with any of `text` (string), `audio` and `image` (encoded file
bytes, or the same base64-encoded as a string); a row may leave any of them empty, not all. Output: one
L2-normalised float32 embedding per row, shape (rows, embedding_dim).
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec

CHECKPOINT_ARTIFACT = "checkpoint"  # = cman.api.CHECKPOINT_ARTIFACT
COLUMNS = ("text", "audio", "image")
INPUT_EXAMPLE = {"text": ["a large red circle on the left", "a small blue square on the right"]}
REQUIREMENTS = (
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "safetensors",
    "numpy",
    "pydantic",
    "pyyaml",
    "soundfile",
    "soxr",
    "pillow",
    "pandas",
    "mlflow",
)


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _media(value: Any, column: str, row: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_input(f"row {row}: `{column}` is a string but not valid base64; send file bytes") from None
    raise _bad_input(f"row {row}: `{column}` must be bytes or a base64 string, got {type(value).__name__}")


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str | bytes) and len(value) == 0


def _records(model_input: Any) -> list[dict[str, Any]]:

    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    unknown = [c for c in frame.columns if c not in COLUMNS]
    if unknown:
        raise _bad_input(f"unknown input column(s) {unknown}; send any of {list(COLUMNS)}")
    return frame.to_dict("records")


class CMANPyfunc(PythonModel):
    """Embeds each row's text / audio / image (any non-empty subset: a composed query) with the logged checkpoint."""

    def load_context(self, context) -> None:  # context: MLflow PythonModelContext
        from cman.models.cman import CMAN

        self.model = CMAN.from_pretrained(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        # `pd.DataFrame` (what pyfunc passes for a column signature) is a hint MLflow infers no schema from: the
        # signature stays the explicit one (model_signature), and MLflow's "Add type hints" warning is not raised
        rows = _records(model_input)
        groups: dict[tuple[str, ...], list[int]] = {}
        parsed: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            present = {c: row[c] for c in COLUMNS if c in row and not _empty(row[c])}
            if not present:
                raise _bad_input(f"row {i} is empty: send at least one of text, audio, image")
            for column in ("audio", "image"):
                if column in present:
                    present[column] = _media(present[column], column, i)
            parsed.append(present)
            groups.setdefault(tuple(present), []).append(i)
        dim = self.model.config.model.embedding_dim
        out = np.zeros((len(rows), dim), dtype=np.float32)  # (rows, dim)
        for columns, index in groups.items():
            batch = {c: [parsed[i][c] for i in index] for c in columns}
            try:
                out[index] = self.model.embed(**batch)
            except ValueError as err:  # DataError included: undecodable media, empty caption
                raise _bad_input(f"rows {index}: {err}") from None
        return out


def model_signature(embedding_dim: int) -> ModelSignature:
    inputs = Schema(
        [
            ColSpec("string", "text", required=False),
            ColSpec("binary", "audio", required=False),
            ColSpec("binary", "image", required=False),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, embedding_dim), name="embedding")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pinned_requirements() -> list[str]:
    """`name==version` of what the model needs at load time, as installed here (local tags like +cpu dropped)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def _embedding_dim(checkpoint: Path) -> int:
    import yaml

    config = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    return int((config.get("model") or {}).get("embedding_dim", 512))


def save_cman_model(checkpoint: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model directory for `checkpoint` at `path` (which must not exist)."""
    import cman

    checkpoint = Path(checkpoint).resolve()
    if not (checkpoint / "config.yaml").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a CMAN checkpoint (no config.yaml)")
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).resolve()),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
        code_paths=[str(Path(cman.__file__).resolve().parent)],
        signature=model_signature(_embedding_dim(checkpoint)),
        input_example=INPUT_EXAMPLE,
        pip_requirements=pinned_requirements(),
        metadata={"cman_version": cman.__version__},
    )
    return Path(path)


def log_cman_model(client: Any, run_id: str, checkpoint: str | Path, artifact_path: str = "model") -> str:
    """Log `checkpoint` as the pyfunc model `runs:/<run_id>/<artifact_path>` (register it with that URI)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = save_cman_model(checkpoint, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(local), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


# Executed as MLflow model code (`python_model=<this file>`): the model object MLflow loads.
mlflow.models.set_model(CMANPyfunc())
