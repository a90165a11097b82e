"""The sweep's search space, from `config.tune.space`: the four named dimensions and any dotted config key.

A trial's Tune config holds a value per swept dimension: `rank`, `alpha_ratio`, `margin`, `lr` for the named four
(each left out where `tune.space.<name>` is null) and the dotted key itself for the others (`model.fusion.layers`).
`trial_config` turns them into a full `CMANConfig`, `trial_params` into what every MLflow run and the sweep's table
record (`rank alpha margin lr` and the dotted keys).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import tune

from cman.config import NAMED_SPACE_KEYS, CMANConfig, ConfigError, TuneSpace, from_dict

logger = logging.getLogger(__name__)

# named dimension -> its key in a trial's Tune config (the config key each sets: cman.config.NAMED_SPACE_KEYS)
_TUNE_KEYS = {"rank": "rank", "alpha_ratio": "alpha_ratio", "margin": "margin", "learning_rate": "lr"}


def validate_space(config: CMANConfig) -> TuneSpace:
    """Check `config.tune.space` and that every corner of it makes a valid trial config; `ConfigError` otherwise."""
    config = from_dict(config.to_dict())  # re-validate: the config may have been assembled in code
    space = config.tune.space
    corners: dict[str, list[dict[str, Any]]] = {
        name: [{_TUNE_KEYS[name]: v} for v in getattr(space, name)]
        for name in _TUNE_KEYS
        if getattr(space, name) is not None
    }
    for key, dist in space.swept_keys().items():
        corners[key] = [{key: v} for v in next(iter(dist.values()))]  # every choice, or both ends of a range
    base = baseline_point(config)
    for key, points in corners.items():
        for point in points:
            try:
                trial_config(config, {**base, **point})
            except ConfigError as err:
                value = next(iter(point.values()))
                raise ConfigError(f"tune.space.{key}: {value} does not give a valid trial config ({err})") from None
    return space


def config_value(config: CMANConfig, key: str) -> Any:
    """The value at dotted `key` of `config`; `ConfigError` naming the key where there is none."""
    node: Any = config.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"tune.space.{key}: the config has no key {key!r} (`cman config show` lists them)")
        node = node[part]
    return node


def baseline_point(config: CMANConfig) -> dict[str, Any]:
    """The config's own values of every swept dimension, evaluated first so trial 0 is always the baseline."""
    space = config.tune.space
    point = {
        tune_key: config.peft.alpha / config.peft.rank
        if name == "alpha_ratio"
        else config_value(config, NAMED_SPACE_KEYS[name])
        for name, tune_key in _TUNE_KEYS.items()
        if getattr(space, name) is not None
    }
    return {**point, **{key: config_value(config, key) for key in space.swept_keys()}}


def _with_value(choices: list, value: Any, key: str) -> list:
    if value in choices:
        return list(choices)
    logger.info("tune.space.%s: adding the config's own value %s so the baseline trial can use it", key, value)
    return [*choices, value]


def _dimension(kind: str, values: list, base: Any, key: str) -> Any:
    if kind == "choice":
        return tune.choice(_with_value(values, base, key))
    if kind == "int":
        return tune.randint(values[0], values[1] + 1)  # Tune's upper end is exclusive; ours is included
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(*values)


def param_space(config: CMANConfig) -> dict[str, Any]:
    """Tune search space. The baseline point is evaluated as given, even outside the ranges (Optuna warns);
    categorical choices gain the baseline's value, since Optuna cannot enqueue a value outside the choices."""
    space = validate_space(config)
    base = baseline_point(config)
    dims = {
        "rank": ("choice", space.rank),
        "alpha_ratio": ("choice", space.alpha_ratio),
        "margin": ("uniform", space.margin),
        "learning_rate": ("loguniform", space.learning_rate),
    }
    out = {
        _TUNE_KEYS[name]: _dimension(kind, list(values), base[_TUNE_KEYS[name]], name)
        for name, (kind, values) in dims.items()
        if values is not None
    }
    for key, dist in space.swept_keys().items():
        kind, values = next(iter(dist.items()))
        out[key] = _dimension(kind, list(values), base[key], key)
    return out


def trial_params(trial_config: dict[str, Any]) -> dict[str, Any]:
    """What a trial ran with: `rank`, `alpha` (= ratio * rank), `margin`, `lr` where swept, then the dotted keys."""
    params: dict[str, Any] = {}
    if "rank" in trial_config:
        params["rank"] = int(trial_config["rank"])
    if "alpha_ratio" in trial_config and "rank" in params:
        params["alpha"] = float(trial_config["alpha_ratio"]) * params["rank"]
    elif "alpha_ratio" in trial_config:
        params["alpha_ratio"] = float(trial_config["alpha_ratio"])
    if "margin" in trial_config:
        params["margin"] = float(trial_config["margin"])
    if "lr" in trial_config:
        params["lr"] = float(trial_config["lr"])
    return {**params, **{k: v for k, v in trial_config.items() if "." in k}}


def trial_config(base: CMANConfig, trial: dict[str, Any]) -> CMANConfig:
    """`base` with a trial's values applied (alpha_ratio multiplies the trial's rank, else the config's)."""
    overrides: dict[str, Any] = {k: v for k, v in trial.items() if "." in k}
    for name in ("margin", "learning_rate"):
        if _TUNE_KEYS[name] in trial:
            overrides[NAMED_SPACE_KEYS[name]] = trial[_TUNE_KEYS[name]]
    if "rank" in trial:
        overrides["peft.rank"] = int(trial["rank"])
    if "alpha_ratio" in trial:
        rank = int(trial.get("rank", overrides.get("peft.rank", base.peft.rank)))
        overrides["peft.alpha"] = float(trial["alpha_ratio"]) * rank
    return base.with_overrides(overrides)
