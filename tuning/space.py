"""The sweep's search space: LoRA rank/alpha, loss margin and learning rate, from `config.tune.space`.

A trial's Tune config holds four values (`rank`, `alpha_ratio`, `margin`, `lr`); `trial_config` turns them into a
full `CMANConfig` and `trial_params` into the four parameters every MLflow run records (`rank alpha margin lr`).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import tune

from cman.config import CMANConfig, ConfigError, TuneSpace, from_dict

logger = logging.getLogger(__name__)

PARAM_NAMES: tuple[str, ...] = ("rank", "alpha", "margin", "lr")


def validate_space(config: CMANConfig) -> TuneSpace:
    """Check `config.tune.space` and that every corner of it makes a valid trial config; `ConfigError` otherwise."""
    config = from_dict(config.to_dict())  # re-validate: the config may have been assembled in code
    space = config.tune.space
    corners = {
        "rank": [{"rank": r} for r in space.rank],
        "alpha_ratio": [{"alpha_ratio": a} for a in space.alpha_ratio],
        "margin": [{"margin": m} for m in space.margin],
        "learning_rate": [{"lr": lr} for lr in space.learning_rate],
    }
    for key, points in corners.items():
        for point in points:
            try:
                trial_config(config, {**baseline_point(config), **point})
            except ConfigError as err:
                value = next(iter(point.values()))
                raise ConfigError(f"tune.space.{key}: {value} does not give a valid trial config ({err})") from None
    return space


def baseline_point(config: CMANConfig) -> dict[str, Any]:
    """The config's own values, evaluated first so trial 0 is always the baseline."""
    return {
        "rank": config.peft.rank,
        "alpha_ratio": config.peft.alpha / config.peft.rank,
        "margin": config.loss.margin,
        "lr": config.training.learning_rate,
    }


def _with_value(choices: list, value: Any, key: str) -> list:
    if value in choices:
        return list(choices)
    logger.info("tune.space.%s: adding the config's own value %s so the baseline trial can use it", key, value)
    return sorted({*choices, value})


def param_space(config: CMANConfig) -> dict[str, Any]:
    """Tune search space. The baseline point is evaluated as given, even outside the ranges (Optuna warns);
    categorical choices gain the baseline's value, since Optuna cannot enqueue a value outside the choices."""
    space = validate_space(config)
    base = baseline_point(config)
    return {
        "rank": tune.choice(_with_value(space.rank, base["rank"], "rank")),
        "alpha_ratio": tune.choice(_with_value(space.alpha_ratio, base["alpha_ratio"], "alpha_ratio")),
        "margin": tune.uniform(*space.margin),
        "lr": tune.loguniform(*space.learning_rate),
    }


def trial_params(trial_config: dict[str, Any]) -> dict[str, Any]:
    """`{"rank", "alpha", "margin", "lr"}` of a trial (alpha = ratio * rank)."""
    rank = int(trial_config["rank"])
    return {
        "rank": rank,
        "alpha": float(trial_config["alpha_ratio"]) * rank,
        "margin": float(trial_config["margin"]),
        "lr": float(trial_config["lr"]),
    }


def trial_config(base: CMANConfig, trial: dict[str, Any]) -> CMANConfig:
    """`base` with a trial's values applied."""
    params = trial_params(trial)
    return base.with_overrides(
        {
            "peft.rank": params["rank"],
            "peft.alpha": params["alpha"],
            "loss.margin": params["margin"],
            "training.learning_rate": params["lr"],
        }
    )
