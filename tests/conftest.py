"""Shared fixtures: one Ray instance per test session, and a tiny trained CMAN checkpoint on a tiny demo dataset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tiny import REPO

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller collects the workers' reports and notices a run's end when it polls them: every 0.5 s here
# instead of every 2 s (measured in stop 17: a trivial fit returns ~1 s after its last report instead of ~5 s). Every
# Train run of the suite gets it: the session's, and those of the `cman` subprocesses and the `ray start` cluster,
# which inherit this environment. Only timing changes: a worker's result queue holds one report either way.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from jobs.cluster import LOCAL_RAY_ENV

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        # the env `jobs.cluster.connect` gives a local Ray it starts (no preemption watcher actor per Train run)
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **LOCAL_RAY_ENV}},
    )
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (tests/pg_server.py) for the gallery store's tests; `postgres.database()` gives a
    fresh database URL. Without the server binaries this fails (it does not skip): `make install` installs them."""
    from pg_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


# ---- a tiny trained model on a tiny demo dataset (serve, index and demo-page tests) ---------------------------------
DEMO_COUNTS = {"train": 48, "val": 12, "test": 16}


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cman.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo_data")
    generate_demo_dataset(root, seed=0, counts=DEMO_COUNTS)
    return root


@pytest.fixture(scope="session")
def trained_checkpoint(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/best of a few epochs of in-process training of configs/demo.yaml on `demo_root`."""
    from cman.config import load_config
    from cman.training import fit

    out = tmp_path_factory.mktemp("trained")
    overrides = {"data.root": str(demo_root), "training.epochs": 4, "training.batch_size": 16, "output_dir": str(out)}
    fit(load_config(REPO / "configs" / "demo.yaml", overrides), out, resume=False, progress=False)
    return out / "checkpoints" / "best"


SERVE_APP = "cman"
SERVE_UPLOAD_MB = 0.5
SERVE_OVERRIDES = {
    "max_upload_mb": SERVE_UPLOAD_MB,
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.05,
    # small limits so that tests can send inputs at and just past each one cheaply
    "max_text_chars": 200,
    "max_audio_seconds": 8.0,
    "max_image_pixels": 200 * 200,
    "health_check_period_s": 2.0,
}


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(autouse=True, scope="module")
def _no_ray_leftovers_from_the_module(request: pytest.FixtureRequest):
    """A module that leaves a placement group on the session's Ray fails here, by name:
    whatever it holds would otherwise surface as unrelated Serve or Train failures modules later (a CPU held by a
    leaked worker group leaves Serve replicas unplaceable). Leftovers get 30 s to go away (Ray removes them
    asynchronously). The session's served app holds CPUs on purpose, through its replicas, not placement groups."""
    before = set(held_placement_groups()) if _ray_up() else set()
    yield
    if not _ray_up():
        return
    import time

    deadline = time.monotonic() + 30
    while True:
        groups = {k: v for k, v in held_placement_groups().items() if k not in before}
        if not groups:
            return
        if time.monotonic() > deadline:
            for group_id in groups:  # the next modules get a clean Ray; this one has failed already
                _remove_group(group_id)
            pytest.fail(
                f"{request.module.__name__} left placement groups on the session's Ray: {groups}", pytrace=False
            )
        time.sleep(0.5)


def _remove_group(group_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def held_placement_groups() -> dict[str, dict]:
    """Placement groups still reserving resources on the session's Ray: id -> bundles."""
    import ray

    return {k: v["bundles"] for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}


def serve_run_within(app, name: str, route_prefix: str, timeout_s: float = 240.0) -> None:
    """`serve.run`, which waits for RUNNING without end, bounded: a deployment that cannot be placed fails the
    test in `timeout_s` with what the cluster holds, instead of hanging until pytest's timeout."""
    import threading

    import ray
    from ray import serve

    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name=name, route_prefix=route_prefix)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            failure.append(err)

    thread = threading.Thread(target=deploy, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if failure:
        raise failure[0]
    if thread.is_alive():
        status = serve.status().applications.get(name)
        held = held_placement_groups()
        serve.delete(name)
        pytest.fail(
            f"Serve app {name!r} not RUNNING after {timeout_s:.0f} s: {status}; available {ray.available_resources()}"
            f"; placement groups held {held}"
        )


def run_serve_app(args) -> float:
    """`serve.run` the CMAN application for `args` (a ServeArgs); returns the seconds it took."""
    import time

    from serve_app.app import build_app

    start = time.perf_counter()
    serve_run_within(build_app(args), SERVE_APP, "/")
    return time.perf_counter() - start


@pytest.fixture(scope="session")
def served_app(ray_session, trained_checkpoint: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The Serve application over `trained_checkpoint` + an index of the demo test split, on a free local port."""
    import socket

    from ray import serve

    from jobs.build_index import build_index
    from serve_app.app import ServeArgs

    index_dir = tmp_path_factory.mktemp("serve_index")
    build_index(trained_checkpoint, "test", index_dir, root=demo_root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(checkpoint=str(trained_checkpoint), index_dir=str(index_dir), serve=SERVE_OVERRIDES)
    seconds = run_serve_app(args)
    print(f"\nserve.run took {seconds:.1f} s")
    yield {
        "url": f"http://127.0.0.1:{port}",
        "args": args,
        "index_dir": index_dir,
        "root": demo_root,
        "start_seconds": seconds,
    }
    serve.delete(SERVE_APP)


def pytest_collection_modifyitems(config, items):
    """Tests that keep the Serve app up run last: its replicas hold CPUs that Ray Train/Tune tests need."""
    items.sort(key=lambda item: "served_app" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uri_stays_in_its_module():
    """`mlflow.set_tracking_uri` (tests, the sweep driver) also sets MLFLOW_TRACKING_URI for subprocesses: without
    this, a later module's `cman train` / `ray job submit` / sweep would log into an earlier module's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before)  # None unsets the variable too
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
