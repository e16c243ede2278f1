"""The search space: its checks, sampling it, and the trainer's config resolved with a trial's params."""

from parallel_optuna.options import ConfigError


def check_search_space(config, source):
    space = config.get("search_space") or {}
    if not isinstance(space, dict):
        raise ConfigError(source, "search_space", "is not a mapping", "map dotted config paths to {type: ...} specs")
    for name, spec in space.items():
        key = f"search_space.{name}"
        if not isinstance(name, str):
            raise ConfigError(source, key, "is not a dotted path", f"name a key of the config ({_sections(config)})")
        try:
            get_dotted(config, name)
        except KeyError:
            raise ConfigError(
                source,
                key,
                f"'{name}' is not a key of the config",
                f"name an existing dotted path ({_sections(config)})",
            ) from None
        if not isinstance(spec, dict):
            raise ConfigError(source, key, "is not a mapping", "write {type: int|float|categorical, ...}")
        kind = spec.get("type")
        allowed = {
            "int": {"type", "low", "high", "step", "log"},
            "float": {"type", "low", "high", "step", "log"},
            "categorical": {"type", "choices"},
        }
        if kind not in allowed:
            raise ConfigError(source, f"{key}.type", f"unknown type {kind!r}", "use int, float or categorical")
        extra = sorted(set(spec) - allowed[kind])
        if extra:
            raise ConfigError(
                source, f"{key}.{extra[0]}", f"not an option of type {kind}", f"use {', '.join(sorted(allowed[kind]))}"
            )
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(source, f"{key}.choices", "must be a non-empty list", "write choices: [a, b, c]")
            continue
        _check_range(spec, key, source, int if kind == "int" else float)


def type_mismatches(config):
    """Searched keys whose YAML value is an int (not 0) sampled as floats: a trainer using it as a count fails."""
    return [
        f"search_space.{name} samples floats, but the YAML's {name} is the int {value}; type: int if it counts"
        for name, spec in sampled_space(config).items()
        if spec.get("type") == "float" and type(value := get_dotted(config, name)) is int and value != 0
    ]


def _sections(config):
    ours = {"study", "slurm", "search_space"}
    return "sections: " + ", ".join(k for k in config if k not in ours)


def _check_range(spec, key, source, number):
    kinds = (int,) if number is int else (int, float)
    for bound in ("low", "high", "step"):
        value = spec.get(bound)
        if bound == "step" and value is None:
            continue
        if value is None:
            raise ConfigError(source, f"{key}.{bound}", "is missing", f"give {bound} as {number.__name__}")
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(
                source, f"{key}.{bound}", f"{value!r} is not a number", f"give {bound} as {number.__name__}"
            )
    if spec["low"] > spec["high"]:
        raise ConfigError(source, key, f"low {spec['low']} > high {spec['high']}", "swap low and high")
    if spec.get("step") is not None and spec["step"] <= 0:
        raise ConfigError(source, f"{key}.step", f"{spec['step']} is not positive", "give a step > 0 or leave it out")
    if spec.get("log") and spec["low"] <= 0:
        raise ConfigError(source, f"{key}.low", "log scale needs low > 0", "set low > 0 or log: false")
    if spec.get("log") and spec.get("step") is not None:
        raise ConfigError(source, key, "step and log cannot be combined", "drop step or log")


def sample_params(trial, space):
    """Ask the trial for each search-space entry; the params keep their dotted names."""
    for name, spec in space.items():
        if spec["type"] == "categorical":
            trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step") or 1, log=bool(spec.get("log")))
        else:
            trial.suggest_float(name, spec["low"], spec["high"], step=spec.get("step"), log=bool(spec.get("log")))
    return dict(trial.params)


def get_dotted(config, dotted):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def sampled_space(config):
    """The YAML's search space, which a plain objective replaces with its own suggestions."""
    return {} if config["study"]["objective"] else config.get("search_space") or {}
