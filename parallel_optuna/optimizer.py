"""The sampler and the pruner that the YAML names, built and described."""

import inspect

import optuna

from parallel_optuna import samplers
from parallel_optuna.config import directions, metric_names
from parallel_optuna.options import ConfigError
from parallel_optuna.search_space import get_dotted, sampled_space
from parallel_optuna.user_code import HUB, import_class, import_hub_class


def build_sampler(config, seed_offset=0, source="config"):
    """This worker's sampler: the YAML's, or the default for the search space (samplers.py)."""
    spec = config["study"]["sampler"]
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(source, "study.sampler.seed", f"{seed!r} is not an integer", "give seed as an int")
    unnamed = sorted(set(spec) - {"name", "seed"}) if "name" not in spec else []
    if unnamed:  # the default is one sampler or another (or two): options of which one?
        fix = "name the sampler they are for (name: TPESampler, say), or keep only seed for the default"
        raise ConfigError(source, "study.sampler", f"options {', '.join(unnamed)} without a sampler name", fix)
    space, n_trials = sampled_space(config), config["study"]["n_trials"]
    name, options = samplers.resolve(spec, space, n_trials, seed_offset)
    if name == samplers.PORTFOLIO:
        return samplers.portfolio(options.get("seed"))
    return _build(optuna.samplers, {"name": name, **options}, "study.sampler", source, config)


def describe_sampler(config):
    study = config["study"]
    return samplers.describe(study["sampler"], sampled_space(config), study["n_trials"], bool(study["objective"]))


def values_text(config, values, study=None):
    """'val_loss = 0.123, val_acc = 0.9': a trial's values named by the study's metrics (config.metric_names)."""
    values = values if isinstance(values, (list, tuple)) else [values]
    names = metric_names(config, study)
    return ", ".join(f"{name} = {value:.6g}" for name, value in zip(names, values, strict=False))


def build_pruner(config, source="config"):
    spec = config["study"]["pruner"] or {"name": "NopPruner" if len(directions(config)) > 1 else "MedianPruner"}
    return _build(optuna.pruners, dict(spec), "study.pruner", source, config)


def _build(namespace, spec, key, source, config=None):
    """An Optuna sampler or pruner from its YAML form: {name: Class, option: value, ...}.

    An option that is itself {name: ...} is built the same way (PatientPruner's wrapped_pruner,
    PartialFixedSampler's base_sampler); GridSampler's grid comes from the YAML's search space.
    """
    name = spec.pop("name")
    if ":" in name:  # the user's own class, module:Class, found as their trainer is; or hub:<folder>:Class
        return _build_users(namespace, name, spec, key, source, config)
    cls = getattr(namespace, name, None)
    if not isinstance(cls, type):
        raise ConfigError(source, f"{key}.name", f"unknown {name!r}", f"use an optuna.{namespace.__name__[7:]} class")
    package = samplers.missing_package(name)
    if package:
        raise ConfigError(source, f"{key}.name", f"{name} needs the package {package}", f"pip install {package}")
    for option, value in list(spec.items()):
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            spec[option] = _build(namespace, dict(value), f"{key}.{option}", source, config)
    if name == "GridSampler":
        cls = samplers.GridSampler  # ask/tell workers: an exhausted grid must not raise
        if "search_space" not in spec and config is not None:
            spec["search_space"] = grid_of(config, source)
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(source, key, f"bad option ({e})", f"see the options of optuna {name}") from None


def _build_users(namespace, name, spec, key, source, config):
    base = optuna.samplers.BaseSampler if namespace is optuna.samplers else optuna.pruners.BasePruner
    load = import_hub_class if name.startswith(HUB) else import_class
    cls = load(config, name, f"{key}.name", source, base)
    if "seed" in spec and "seed" not in inspect.signature(cls).parameters:
        spec.pop("seed")  # the per-worker seed goes only to a class that takes one
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(source, key, f"bad option ({e})", f"see the options of {name}") from None


def grid_of(config, source):
    """GridSampler's grid, from the search space: categorical choices, and int/float ranges with a step."""
    grid = {}
    for name, spec in (config.get("search_space") or {}).items():
        if spec["type"] == "categorical":
            grid[name] = list(spec["choices"])
        elif spec.get("step") is not None or spec["type"] == "int":
            step = spec.get("step") or 1
            count = int(round((spec["high"] - spec["low"]) / step)) + 1
            grid[name] = [round(spec["low"] + i * step, 12) for i in range(count)]
        else:
            raise ConfigError(
                source,
                f"search_space.{name}",
                "a float range without step has no grid",
                "give it a step for GridSampler",
            )
    if not grid:
        raise ConfigError(
            source, "study.sampler", "GridSampler needs a grid", "declare search_space, or sampler.search_space"
        )
    return grid


def base_params(config, source):
    """study.enqueue_base: the YAML's own values of the searched keys, measured first as the baseline."""
    params = {name: get_dotted(config, name) for name in config.get("search_space") or {}}
    for name, value in params.items():
        spec = config["search_space"][name]
        inside = (
            value in spec["choices"]
            if spec["type"] == "categorical"
            else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and spec["low"] <= value <= spec["high"]
            )
        )
        if not inside:
            raise ConfigError(
                source,
                name,
                f"{value!r} lies outside search_space.{name}",
                "set a value inside it, or enqueue_base: false",
            )
    return params
