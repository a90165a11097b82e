"""Pause points: a testing aid that stops a running job at a named point until it is told to go on.

A fault test has to kill a process *at a point it controls* (after checkpoint 2 is registered, after the first index
shard is written), not "sleep N seconds and hope the run is still going": a box twice as fast finishes first. Set

    CMAN_PAUSE_DIR=<dir>  CMAN_PAUSE_AT=<pattern>[,<pattern>...]

and every pause point whose name matches a pattern (`fnmatch`, e.g. `train-*-epoch-3`) writes `<dir>/<name>.paused`
and waits until `<dir>/<name>.go` or `<dir>/go` exists (or `CMAN_PAUSE_TIMEOUT_S`, default 600 s, passes, when it
goes on by itself). The test kills the process while it waits, or lets it go on. Unset, a point costs one dict
lookup. The points:

- `train-<run>-epoch-<k>`: rank 0 of a Ray Train run (`jobs.train`, every Tune trial) before epoch k starts, i.e.
  after epoch k-1's report (and checkpoint) returned; `<run>` is the loop's output folder name (the trial id in a
  sweep, the `--output-dir` folder's name for `cman train`).
- `index-<modality>-shard-<i>`: `cman index` on Ray Data, before shard i's file is written.

The settings travel in the Train loop's config and in the job's runtime env (`jobs.cluster`), so a worker on another
node pauses the same way.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DIR_ENV = "CMAN_PAUSE_DIR"
AT_ENV = "CMAN_PAUSE_AT"
TIMEOUT_ENV = "CMAN_PAUSE_TIMEOUT_S"
ENV_VARS = (DIR_ENV, AT_ENV, TIMEOUT_ENV)  # handed to Ray's workers with the job's runtime env (jobs.cluster)


def settings() -> dict[str, str]:
    """This process's pause settings (to hand to a worker); empty when pausing is off."""
    return {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}


def pause_point(name: str, given: dict[str, str] | None = None) -> None:
    """Wait here if `name` matches a configured pattern (see the module docstring); return at once otherwise."""
    given = settings() if given is None else given
    directory, patterns = given.get(DIR_ENV), given.get(AT_ENV, "")
    if not directory or not any(fnmatch.fnmatchcase(name, p.strip()) for p in patterns.split(",") if p.strip()):
        return
    folder = Path(directory)
    go = (folder / f"{name}.go", folder / "go")
    if any(p.exists() for p in go):
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.paused").write_text(f"{os.getpid()}\n")
    logger.warning("pause point %s: waiting for %s (%s)", name, go[0], DIR_ENV)
    deadline = time.monotonic() + float(given.get(TIMEOUT_ENV, 600))
    while not any(p.exists() for p in go) and time.monotonic() < deadline:
        time.sleep(0.1)
