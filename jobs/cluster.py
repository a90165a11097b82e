"""Connecting to Ray, written once: `cman train`, `tune`, `index`, `serve` and the quickstart all call `connect`.

`connect(address)` joins `address`, else `RAY_ADDRESS`, else starts a local Ray with the dashboard bound to
127.0.0.1 (Ray Train's placement-group cleaner and `serve status` need it) and prints the dashboard URL.
Environment variables the workers need (offline Hugging Face, the MLflow URI) travel in the runtime env, unless a
surrounding `ray job submit` already sets them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from jobs import faults

logger = logging.getLogger(__name__)
_dashboard: dict[str, str] = {}  # the URL of the dashboard of the Ray this process started

WORKER_ENV_VARS = (
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_ENDPOINT",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_TRACKING_URI",
    *faults.ENV_VARS,  # pause points of fault tests, where set
)
VERBOSE_ENV = "CMAN_VERBOSE"  # set by `cman -v`: Ray's and the workers' own logs and progress bars come back
QUIET_WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' "Writing model shards" bars per checkpoint
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a `ray job submit` entrypoint (its runtime env)
# Only for the single-node Ray that `connect` starts itself: Ray Train's preemption watcher (one more actor per Train
# run, polling for nodes being drained) has no other node to watch there, and its creation logs a core_worker ERROR
# ("constructor arguments in the object store and max_restarts > 0") on the console of every run and sweep trial.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Only for the local Ray that `connect` starts: Ray runs its worker processes at nice 15 so that its own system
# processes win the CPU. On a laptop the training worker is the work; at nice 15 every wake-up of the dashboard,
# the Tune driver or MLflow preempted one of its two threads, and the other waited at the next barrier (measured on
# 2 cores, the demo config: Ray Train epochs 9.0-12.1 s at nice 15 vs 4.8-6.3 s at 0 beside one other busy process;
# in-process 4.9-6.8 s). A cluster's nodes keep their own setting (`ray start` reads RAY_worker_niceness).
LOCAL_WORKER_NICENESS = ("RAY_worker_niceness", "0")
# Ray Train gives up on a worker group that cannot start within 60 s. A cluster that lost a node (or waits for its
# autoscaler) has the capacity back only when another trial ends: the run waits for it instead of failing.
TRAIN_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800")


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster `connect(address)` joins: `address`, else `RAY_ADDRESS`; None = it starts a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True, verbose: bool | None = None
) -> bool:
    """Join `address` / `RAY_ADDRESS` or start a local Ray; False (nothing done) if Ray is already initialised.

    A local start binds the dashboard to 127.0.0.1 and logs its URL. The caller that got True calls
    `ray.shutdown()` when done (see `session`).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(address)
    verbose = is_verbose() if verbose is None else verbose
    os.environ.setdefault(*TRAIN_START_TIMEOUT)  # read by Ray Train in this process and handed to its controllers
    given = job_env_vars()
    env_vars = {
        k: os.environ[k] for k in (*WORKER_ENV_VARS, TRAIN_START_TIMEOUT[0]) if k in os.environ and k not in given
    }
    if not verbose:
        env_vars = {**QUIET_WORKER_ENV, **env_vars}
        os.environ.update({k: v for k, v in QUIET_WORKER_ENV.items() if k not in os.environ})
    if not address:
        env_vars = {**LOCAL_RAY_ENV, **env_vars}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if not verbose:  # every Ray worker process (Train controllers and workers, Tune trials) starts quiet
        runtime_env["worker_process_setup_hook"] = "jobs.cluster.quiet_worker_process"
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if not verbose:
        kwargs["logging_level"] = logging.WARNING
    if not address:
        os.environ.setdefault(*LOCAL_WORKER_NICENESS)  # read by the raylet this ray.init starts
        kwargs["num_cpus"] = num_cpus
        kwargs["include_dashboard"] = dashboard
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
    context = ray.init(address=address, **kwargs)
    url = getattr(context, "dashboard_url", None)
    if url:
        _dashboard["url"] = url if "://" in url else f"http://{url}"
        print(f"Ray dashboard: {_dashboard['url']}", flush=True)
    return True


def dashboard_url() -> str | None:
    """The dashboard URL of the local Ray that `connect` started (None if it joined a cluster or has none)."""
    import ray

    return _dashboard.get("url") if ray.is_initialized() else None


class session:  # noqa: N801 - used like a function: `with cluster.session(address): ...`
    """`with session(address):` connects (see `connect`) and shuts Ray down on exit only if it started it."""

    def __init__(self, address: str | None = None, **kwargs: Any):
        self.address, self.kwargs, self.started = address, kwargs, False

    def __enter__(self) -> bool:
        self.started = connect(self.address, **self.kwargs)
        return self.started

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            import ray

            ray.shutdown()
            _dashboard.clear()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


QUIET_LOGGERS = {  # logger -> level, in the CLI process and (see `quiet_worker_process`) every Ray worker process
    "transformers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
    "peft": logging.ERROR,
    "faiss": logging.WARNING,  # "Loading faiss with AVX2 support", "Successfully loaded faiss"
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables" per new store
    "alembic": logging.WARNING,
    "optuna": logging.WARNING,  # "A new study created in memory"
    "mlflow.pyfunc": logging.WARNING,  # "Validating input example against model signature"
    "mlflow.models": logging.WARNING,
    "urllib3": logging.ERROR,
    "filelock": logging.ERROR,
    "tensorboardX": logging.ERROR,
    # "Detected that the Ray Train controller actor (...) is dead. Cleaning up placement group": the expected path
    # for every trial that ASHA stops (Tune ends the trial's Train controller); its errors still show
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def quiet_libraries() -> None:
    """The libraries' INFO chatter off (`QUIET_LOGGERS`); `cman -v` does not call this."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars
    for name, value in QUIET_WORKER_ENV.items():  # read when huggingface_hub is first imported
        os.environ.setdefault(name, value)


def quiet_worker_process() -> None:
    """Ray's `worker_process_setup_hook` (set by `connect` unless verbose): the libraries' INFO chatter off in every
    worker process (Ray Data actors, Serve replicas, Train workers), warnings and errors still reach the console. It
    runs at each worker's start, so it only sets logger levels and imports nothing. Ray Train's own lines are set by
    `LoggingConfig` (jobs.launch) and `quiet_train_worker_logs` (called by the Train worker)."""
    quiet_libraries()


def quiet_train_worker_logs() -> None:
    """Ray Train's per-report INFO lines ("Reporting training result", "Checkpoint successfully created") off.

    Its report logger is named by its file path, so it is named here the same way (no private import)."""
    import ray.train

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    context = os.path.join(os.path.dirname(ray.train.__file__), "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def job_env_vars() -> set[str]:
    """Env vars the surrounding `ray job submit` runtime env already sets (ray.init must not set them again)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return set()
    return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
