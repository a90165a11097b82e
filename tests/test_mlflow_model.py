"""The registered `cman@champion` is a real MLflow pyfunc model: the sweep's own logging + registration path
(`jobs.tracking.log_checkpoint` → `jobs.mlflow_model.log_cman_model`, `register_best`) on a real sqlite store;
loaded by `mlflow.pyfunc.load_model` in a fresh process and served by `mlflow models serve` (a real subprocess)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from tiny import REPO

LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np, pandas as pd
rows = json.loads(open(sys.argv[1]).read())
model = mlflow.pyfunc.load_model("models:/cman@champion")
np.save(sys.argv[2], model.predict(pd.DataFrame(rows)))
import cman
print(cman.__file__)
"""


@pytest.fixture(scope="module")
def registry_store(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from jobs import tracking

    tmp = tmp_path_factory.mktemp("mlflow_model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "pyfunc-test", tmp / "artifacts")
    run_id = client.create_run(experiment).info.run_id
    assert tracking.log_checkpoint(client, run_id, trained_checkpoint) == f"runs:/{run_id}/model"
    model = tracking.register_best(client, run_id, {"test_rsum": 1.0, "val_rsum": 1.0})
    assert model["promoted"]
    return {"uri": uri, "tmp": tmp, "client": client, "run_id": run_id}


@pytest.fixture(scope="module")
def queries(demo_root: Path) -> dict:
    """Three rows: a caption, an image (raw bytes / base64), and audio + caption composed."""
    from cman.data.dataset import load_split

    a, b = load_split(demo_root, "test")[:2]
    return {
        "rows": [
            {"text": a.caption},
            {"image": Path(b.image_path).read_bytes()},
            {"text": b.caption, "audio": Path(a.audio_path).read_bytes()},
        ],
        "expected_kwargs": [
            {"text": a.caption},
            {"image": b.image_path},
            {"text": b.caption, "audio": a.audio_path},
        ],
    }


def _expected(checkpoint: Path, kwargs_list: list[dict]) -> np.ndarray:
    from cman import CMAN

    model = CMAN.from_pretrained(checkpoint)
    return np.stack([model.embed(**kwargs) for kwargs in kwargs_list])


def _json_rows(rows: list[dict]) -> list[dict]:
    """JSON rows: media base64-encoded, every column present ("" = absent: MLflow cannot base64-decode a null)."""
    encoded = [{k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in r.items()} for r in rows]
    return [{c: r.get(c, "") for c in ("text", "audio", "image")} for r in encoded]


def _env(uri: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # uvicorn of this venv
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": path}


def test_champion_loads_in_a_fresh_process_with_the_same_embeddings(
    registry_store: dict, queries: dict, trained_checkpoint: Path
) -> None:
    from mlflow.models import Model

    tmp = registry_store["tmp"]
    (tmp / "rows.json").write_text(json.dumps(_json_rows(queries["rows"])))
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, str(tmp / "rows.json"), str(tmp / "out.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
        env=_env(registry_store["uri"]),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp / "out.npy")  # (3, 512)
    np.testing.assert_allclose(got, _expected(trained_checkpoint, queries["expected_kwargs"]), atol=1e-5)
    # the model's own copy of the cman package was imported (code_paths), not the source tree
    assert "/code/cman/" in proc.stdout.strip().splitlines()[-1], proc.stdout

    # the same URI through CMAN's own API (what `cman serve --model models:/cman@champion` resolves)
    from cman import CMAN
    from cman.api import resolve_checkpoint

    local = resolve_checkpoint("models:/cman@champion", tracking_uri=registry_store["uri"])
    assert (local / "heads.safetensors").read_bytes() == (trained_checkpoint / "heads.safetensors").read_bytes()
    model = CMAN.from_pretrained("models:/cman@champion")  # MLflow's current tracking URI (set by the fixture)
    np.testing.assert_allclose(model.embed(**queries["expected_kwargs"][0]), got[0], atol=1e-5)

    info = Model.load(f"runs:/{registry_store['run_id']}/model")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["text", "audio", "image"]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 512]
    assert info.saved_input_example_info is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations(registry_store: dict, queries: dict, trained_checkpoint: Path) -> None:
    port = _free_port()
    log = (registry_store["tmp"] / "serve.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cman@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=registry_store["tmp"],
        env=_env(registry_store["uri"]),
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, (registry_store["tmp"] / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        body = {"dataframe_records": _json_rows(queries["rows"])}
        response = httpx.post(f"{url}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = np.asarray(response.json()["predictions"], dtype=np.float32)
        np.testing.assert_allclose(got, _expected(trained_checkpoint, queries["expected_kwargs"]), atol=1e-5)
        bad = httpx.post(f"{url}/invocations", json={"dataframe_records": [{"text": None}]}, timeout=60)
        assert bad.status_code == 400 and "at least one of text, audio, image" in bad.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
