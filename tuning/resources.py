"""Free a trial's Ray Train worker group when Tune ends the trial.

ASHA stops a trial by killing its Tune driver; the TorchTrainer it was fitting dies with it, but the workers'
placement group lives on until the sweep's job ends. Ray Train's own cleaner finds dead controllers through the
State API, which needs the Ray dashboard; clusters started with `include_dashboard=False` (tests, laptops) would keep
every stopped trial's CPUs reserved and the next trial's workers would never start. This Tune callback, running in
the sweep's driver process, removes the group recorded by the trial's loop (`D/trials/<trial id>/placement_group`).
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

    def __getstate__(self) -> dict:  # Tune checkpoints its callbacks: pending releases belong to this process only
        return {**self.__dict__, "_pending": {}}

    def _release(self, trial_id: str) -> None:
        path = Path(self.trials_dir) / trial_id / PLACEMENT_GROUP_FILE
        if not path.is_file():
            return
        for group_id in path.read_text().split():
            try:
                group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
                if ray.util.placement_group_table(group).get("state") != "REMOVED":
                    remove_placement_group(group)
                    logger.info("released the worker placement group of ended trial %s", trial_id)
            except Exception as err:  # noqa: BLE001 - already gone, or the cluster is shutting down
                logger.debug("placement group %s of trial %s: %s", group_id, trial_id, err)
        path.unlink()
