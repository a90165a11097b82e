"""The sweep's searcher: Optuna's TPE inside Ray Tune (`OptunaSearch`), its study in memory or in an RDB storage.

With `tune.optuna_storage` (an SQLAlchemy URL, e.g. `sqlite:///sweeps/optuna.db`) the study lives in that database
under the sweep's name, so `optuna-dashboard sqlite:///sweeps/optuna.db` or `optuna.load_study(study_name=...,
storage=...)` can watch it while it runs. Without it the study is in memory, as Ray's default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from cman.config import CMANConfig
from tuning.space import baseline_point


def storage_url(url: str) -> str:
    """`url` with a relative sqlite path made absolute (against this process's working directory)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(Path(url.removeprefix(prefix)).resolve())
    return url


def make_searcher(config: CMANConfig, study_name: str) -> Any:
    """`OptunaSearch` (TPE, seeded) whose first point is the config's own values (the baseline trial)."""
    import optuna

    from jobs.cluster import is_verbose

    if not is_verbose():  # optuna configures its own handler at INFO ("A new study created in memory ...")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    tc = config.tune
    points = [baseline_point(config)]
    if not tc.optuna_storage:
        return OptunaSearch(points_to_evaluate=points, seed=tc.seed)
    url = storage_url(tc.optuna_storage)
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind
        raise ValueError(f"tune.optuna_storage {url}: cannot open it as an Optuna storage ({err})") from None
    return ResumableOptunaSearch(points_to_evaluate=points, seed=tc.seed, storage=storage, study_name=study_name)


class ResumableOptunaSearch(OptunaSearch):
    """`OptunaSearch` that enqueues its starting points only if the stored study does not hold them yet.

    Ray's `OptunaSearch` enqueues `points_to_evaluate` whenever it sets up its study, also when Tune restores a sweep
    (`set_search_properties` runs before the saved searcher is loaded). In memory that copy is discarded; in an RDB
    storage it would stay as a WAITING trial and the resumed sweep would run the baseline point a second time.
    """

    def _setup_study(self, mode: Any) -> None:
        points, self._points_to_evaluate = self._points_to_evaluate, []
        try:
            super()._setup_study(mode)
        finally:
            self._points_to_evaluate = points
        for point in points:
            self._ot_study.enqueue_trial(point, skip_if_exists=True)
