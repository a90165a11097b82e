"""Free a trial's Ray Train worker group when Tune ends the trial.

ASHA stops a trial by killing its Tune driver; the TorchTrainer it was fitting dies with it, but the workers'
placement group lives on until the sweep's job ends. Ray Train's own cleaner finds dead controllers through the
State API, which needs the Ray dashboard; clusters started with `include_dashboard=False` (tests, laptops) would keep
every stopped trial's CPUs reserved and the next trial's workers would never start. This Tune callback, running in
the sweep's driver process, removes the group recorded by the trial's loop (`D/trials/<trial id>/placement_group`).

A trial stopped before its loop started (an interrupt while its workers are starting) has recorded nothing, and a
Train controller still alive when the experiment ends may create a group after it: `settle`, called by the sweep once
Tune has returned (on every path: finished, interrupted, failed), removes every group the job created during the sweep
that is not yet removed until none has appeared for a few seconds, pending ones included (a group still waiting for
CPUs is placed a moment later and would then hold them until the job ends). Ray Train's own cleaner is no substitute
even with a dashboard: it learns of a worker group only once its workers have started.
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

    def __init__(self, trials_dir: str, delay_s: float = 3.0):
        self.trials_dir = trials_dir
        self.delay_s = delay_s
        self._pending: dict[str, float] = {}
        self._existing: set[str] = set(ray.util.placement_group_table())

    def setup(self, **info) -> None:
        """The groups that exist before the sweep (re)starts are never touched (also noted at construction, in case
        the sweep fails before Tune sets its callbacks up)."""
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

    def settle(self, quiet_s: float = 3.0, timeout_s: float = 60.0) -> list[str]:
        """After the sweep (every path: finished, interrupted, failed): remove every placement group this job created
        since `setup` that is not yet removed, placed or pending, until none has shown up for `quiet_s`; return the
        ids removed here. Called once Tune has returned, when none of the sweep's trials runs any more.

        Why the quiet period: a worker group's placement group is created by its Train controller, an actor owned by
        the trial's driver actor. Tune has stopped every trial actor when `Tuner.fit` returns; Ray then kills the
        actors they own, and a controller caught restarting its workers can create one more group before it dies.
        Every group the job created since `setup` is the sweep's (Tune's own trial groups included)."""
        deadline = time.monotonic() + timeout_s
        removed: list[str] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s:
            left = self._leftovers()
            for group_id in left:
                self._remove(group_id, "left when the sweep ended")
                removed.append(group_id)
            if left:
                quiet_since = time.monotonic()
            if time.monotonic() > deadline:
                logger.warning("placement groups still being created %.0f s after the sweep ended", timeout_s)
                break
            time.sleep(0.2)
        return removed

    def _leftovers(self) -> list[str]:
        """Groups of this job not yet removed (placed or still pending) and created since `setup`.

        A placement group id ends with the id of the job that created it (Ray's id specification)."""
        job = ray.get_runtime_context().get_job_id()
        return [
            group_id
            for group_id, info in ray.util.placement_group_table().items()
            if group_id not in self._existing and group_id.endswith(job) and info.get("state") != "REMOVED"
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
