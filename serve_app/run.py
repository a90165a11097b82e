"""`cman serve`: start Ray (RAY_ADDRESS or local), run the Serve application and block until Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

APP_NAME = "cman"
QUICKSTART_DIR = Path("outputs/quickstart")
CHAMPION_URI = "models:/cman@champion"


def default_checkpoint() -> Path:
    """The quickstart's best checkpoint if it exists, else MLflow's `cman@champion`, else a clear error."""
    local = QUICKSTART_DIR / "best"
    if (local / "metadata.json").is_file():
        return local
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and (QUICKSTART_DIR / "mlflow.db").is_file():
        uri = f"sqlite:///{(QUICKSTART_DIR / 'mlflow.db').resolve()}"
    if uri:  # never let MLflow create a default ./mlflow.db just to look
        try:
            import mlflow

            path = Path(mlflow.artifacts.download_artifacts(CHAMPION_URI, tracking_uri=uri, registry_uri=uri))
            for candidate in [path, *(p.parent for p in path.rglob("metadata.json"))]:
                if (candidate / "metadata.json").is_file() and (candidate / "config.yaml").is_file():
                    logger.info("serving MLflow %s from %s", CHAMPION_URI, candidate)
                    return candidate
        except Exception as err:  # noqa: BLE001 - no registry / alias / server: all mean "not resolvable"
            logger.info("MLflow %s not resolvable at %s: %s", CHAMPION_URI, uri, err)
    raise FileNotFoundError(
        f"no checkpoint given and none found: neither {local} (run `cman quickstart`) nor MLflow {CHAMPION_URI} "
        "(set MLFLOW_TRACKING_URI to the sweep's store) exists; pass --checkpoint DIR"
    )


def sample_requests(url: str, caption: str = "a large red circle on the left") -> list[str]:
    return [
        f"curl {url}healthz",
        f"curl -F 'text={caption}' -F target=image -F k=5 {url}search",
        f"curl -F image=@some.png -F target=text {url}search",
        f"curl -F audio=@query.wav -F 'text=in the middle' -F target=image {url}search",
        f"curl -F id=my_item -F 'text=my caption' -F image=@my.png {url}items",
    ]


def start_app(
    checkpoint: str | Path,
    index: str | Path,
    config: str | Path | None,
    host: str,
    port: int,
    settings: dict | None = None,
) -> str:
    """Start Ray + Serve (HTTP on host:port) and deploy the application; return its base URL. `settings`: overrides
    of `serve:` keys (the API key among them: never saved in a checkpoint's config, so it comes this way)."""
    from ray import serve

    from jobs import cluster
    from serve_app.app import ServeArgs, build_app, resolve_serve_config

    cluster.connect(os.environ.get("RAY_ADDRESS"))  # hub access left as configured: HF_* passed on only if set
    args = ServeArgs(
        checkpoint=str(checkpoint),
        index_dir=str(index),
        config=str(config) if config else None,
        host=host,
        serve=settings or {},
    )
    # the proxy gives up on a request a little after the app's own timeout, so the app's 504 JSON is what clients see
    proxy_timeout_s = resolve_serve_config(args).request_timeout_s + 10
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": proxy_timeout_s})
    start = time.perf_counter()
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    logger.info("application %r running (serve.run took %.1f s)", APP_NAME, time.perf_counter() - start)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def wait_for_interrupt() -> None:
    """Block until Ctrl-C (SIGINT) or SIGTERM; handlers are installed even where SIGINT starts ignored (`cmd &`)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shutdown() -> None:
    import ray
    from ray import serve

    print("shutting down ...", flush=True)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(
    checkpoint: str | Path | None = None,
    index: str | Path | None = None,
    config: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: dict | None = None,
) -> None:
    """Serve `checkpoint` + `index` over HTTP until Ctrl-C (defaults: the quickstart's outputs); `settings` as in
    `start_app`."""
    checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
    index = Path(index) if index else QUICKSTART_DIR / "index"
    if not (checkpoint / "metadata.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a CMAN checkpoint (no metadata.json)")
    if not index.is_dir():
        raise FileNotFoundError(f"index directory {index} not found; build it with `cman index ... --out {index}`")
    try:
        url = start_app(checkpoint, index, config, host, port, settings)
        print(f"\nCMAN is serving {checkpoint} with index {index}")
        print(f"  demo page:  {url}\n  API docs:   {url}docs\n\ntry:")
        for line in sample_requests(url):
            print(f"  {line}")
        print("\nCtrl-C to stop.", flush=True)
        wait_for_interrupt()
    finally:
        shutdown()
