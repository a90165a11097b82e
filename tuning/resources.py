"""Free a trial's Ray Train worker group when Tune ends the trial.

ASHA stops a trial by killing its Tune driver; the TorchTrainer it was fitting dies with it, but the workers'
placement group lives on until the sweep's job ends. Ray Train's own cleaner finds dead controllers through the
State API, which needs the Ray dashboard; clusters started with `include_dashboard=False` (tests, laptops) would keep
every stopped trial's CPUs reserved and the next trial's workers would never start. This Tune callback, running in
the sweep's driver process, removes the group recorded by the trial's loop (`D/trials/<trial id>/placement_group`).

A trial stopped before its loop started (an interrupt while its workers are starting) has recorded nothing: at the
end of the experiment the callback also removes every worker-shaped group this job created during the sweep that is
not yet removed (none of the sweep's trials runs any more by then), pending ones included: a group still waiting for
CPUs (e.g. the previous trial's, released `delay_s` after it ended) is placed a moment later and would then hold
them until the job ends.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

logger = logging.getLogger(__name__)

PLACEMENT_GROUP_FILE = "placement_group"


class ReleasePlacementGroups(Callback):
    """Remove the worker placement groups of ended trials, `delay_s` after the end (once Tune has stopped the
    trial's driver; removing them earlier would make a still-running Train controller restart its workers)."""

    def __init__(self, trials_dir: str, worker_bundle: dict[str, float], delay_s: float = 3.0):
        self.trials_dir = trials_dir
        self.worker_bundle = dict(worker_bundle)
        self.delay_s = delay_s
        self._pending: dict[str, float] = {}
        self._existing: set[str] = set()

    def setup(self, **info) -> None:
        """The groups that exist before the sweep (re)starts are never touched."""
        self._existing = set(ray.util.placement_group_table())

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._pending[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._pending[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        for trial_id in [t for t, ended in self._pending.items() if now - ended >= self.delay_s]:
            del self._pending[trial_id]
            self._release(trial_id)

    def on_experiment_end(self, trials: list, **info) -> None:
        """Also covers trials cut short by an interrupt (Ctrl-C), which never `complete`."""
        self._pending.clear()
        for trial in trials:
            self._release(trial.trial_id)
        if self._leftovers():
            time.sleep(self.delay_s)  # let the stopped trials' Train controllers die first
            for group_id in self._leftovers():
                self._remove(group_id, "left by a trial stopped before its workers started")

    def _leftovers(self) -> list[str]:
        """Groups of this job not yet removed (placed or still pending), created since `setup`, shaped like the
        sweep's Train worker groups.

        A placement group id ends with the id of the job that created it (Ray's id specification)."""
        job = ray.get_runtime_context().get_job_id()
        return [
            group_id
            for group_id, info in ray.util.placement_group_table().items()
            if group_id not in self._existing
            and group_id.endswith(job)
            and info.get("state") != "REMOVED"
            and info.get("bundles")
            and all(_same_resources(bundle, self.worker_bundle) for bundle in info["bundles"].values())
        ]

    def __getstate__(self) -> dict:  # Tune checkpoints its callbacks: pending releases belong to this process only
        return {**self.__dict__, "_pending": {}}

    def _release(self, trial_id: str) -> None:
        path = Path(self.trials_dir) / trial_id / PLACEMENT_GROUP_FILE
        if not path.is_file():
            return
        for group_id in path.read_text().split():
            self._remove(group_id, f"of ended trial {trial_id}")
        path.unlink()

    @staticmethod
    def _remove(group_id: str, why: str) -> None:
        try:
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
            if ray.util.placement_group_table(group).get("state") != "REMOVED":
                remove_placement_group(group)
                logger.info("released worker placement group %s %s", group_id, why)
        except Exception as err:  # noqa: BLE001 - already gone, or the cluster is shutting down
            logger.debug("placement group %s %s: %s", group_id, why, err)


def _same_resources(bundle: dict[str, float], expected: dict[str, float]) -> bool:
    return set(bundle) == set(expected) and all(abs(bundle[k] - expected[k]) < 1e-6 for k in expected)
