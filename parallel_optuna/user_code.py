"""The user's code: the trainer or the plain objective that study.trainer / study.objective names."""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from parallel_optuna.config import metric_names
from parallel_optuna.options import ConfigError
from parallel_optuna.run_dir import full_filesystem

if TYPE_CHECKING:  # names for the hints only: importing them would make a cycle
    from parallel_optuna.config import Config

# The tool's own top-level names: a user module named so would shadow them (any other name is the user's).
TOOL_MODULES = {"parallel_optuna", "trial_control"}


def code_key(config):
    """The study key that names the user's code: a plain Optuna objective wins over a trainer."""
    return "objective" if config["study"]["objective"] else "trainer"


def trainer_module(config, key="trainer"):
    """The module of study.trainer (or study.objective), imported by one rule for both.

    It is looked up in the experiment's folder, then in the folder the study was submitted from
    (the array file runs there), then on PYTHONPATH as it was at submit time (the array file sets it).
    """
    return import_user_module(config, config["study"][key].partition(":")[0], f"study.{key}")


def import_user_module(config: Config, name: str, key: str):
    """A module of the user's (a trainer's, an objective's, a sampler's), found by the rule trainer_module says."""
    if name.split(".")[0] in TOOL_MODULES:
        raise ConfigError(
            config.path,
            key,
            f"module {name.split('.')[0]!r} has the name of one of Parallel Optuna's own top-level names",
            f"rename your module (not {', '.join(sorted(TOOL_MODULES))})",
        )
    for folder in (os.getcwd(), config.dir):  # each goes first: the experiment's own code wins
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    optimize = optuna.study.Study.optimize
    optuna.study.Study.optimize = _optimize_on_import  # a script's own study.optimize, not under __main__
    try:
        return importlib.import_module(name)
    finally:
        optuna.study.Study.optimize = optimize


def import_class(config: Config, spec: str, key: str, source: str, base: type) -> type:
    """`module:Class` of the user's, a subclass of `base` (optuna's BaseSampler or BasePruner)."""
    module_name, _, class_name = spec.partition(":")
    try:
        module = import_user_module(config, module_name, key)
    except ConfigError:
        raise
    except Exception as e:  # ImportError, or an error inside the user's module
        fix = "put the module in the experiment's folder, the submit folder or on PYTHONPATH"
        raise ConfigError(source, key, f"cannot import {spec!r} ({type(e).__name__}: {e})", fix) from None
    return checked_class(module, class_name, spec, key, source, base)


HUB = "hub:"  # study.sampler.name (or pruner) hub:<package folder>:<Class>, an OptunaHub package on disk


def import_hub_class(config: Config, spec: str, key: str, source: str, base: type) -> type:
    """`hub:<package folder>:<Class>`: a class of an OptunaHub package on disk, loaded as OptunaHub loads one
    (optunahub.load_local_module). The folder is found in the experiment's folder, then the submit folder."""
    folder, _, class_name = spec.removeprefix(HUB).rpartition(":")
    if not folder or not class_name:
        fix = "write hub:<package folder>:<Class>, as hub:my_registry/samplers/my_sampler:MySampler"
        raise ConfigError(source, key, f"{spec!r} names no package folder and class", fix)
    try:
        import optunahub
    except ImportError:
        fix = "pip install -r requirements-extras.txt (or pip install optunahub)"
        problem = f"{spec} needs optunahub, which is not installed (an optional extra)"
        raise ConfigError(source, key, problem, fix) from None
    found = [Path(where, folder).expanduser() for where in (config.dir, os.getcwd())]
    package = next((path for path in found if (path / "__init__.py").is_file()), None)
    if package is None:
        fix = "name the folder that holds the package's __init__.py, from the experiment's folder or an absolute path"
        raise ConfigError(source, key, f"no OptunaHub package (an __init__.py) in {found[0]}", fix)
    # OptunaHub names the module optunahub_registry.package.<package, dotted>: given the whole absolute path,
    # two packages of the same folder name (a sampler's and a pruner's) stay two modules, submodules too.
    package = package.resolve()
    try:
        module = optunahub.load_local_module(
            package=str(package.relative_to(package.anchor)), registry_root=package.anchor
        )
    except Exception as e:  # an error inside the package
        raise ConfigError(source, key, f"cannot load {package} ({type(e).__name__}: {e})", "fix the package") from None
    return checked_class(module, class_name, spec, key, source, base)


def checked_class(module, class_name: str, spec: str, key: str, source: str, base: type) -> type:
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        problem = f"{spec!r} is not a subclass of optuna's {base.__name__}"
        raise ConfigError(source, key, problem, f"name a class derived from {base.__module__}.{base.__name__}")
    return cls


class OptimizeOnImport(Exception):
    """The user's module runs study.optimize() when imported: every array task would run a whole study."""


def _optimize_on_import(*args, **kwargs):
    raise OptimizeOnImport


def load_trainer(config: Config, source: str = "config") -> Callable:
    """The trainer function; its METRICS, if it declares them, must name the study's metric."""
    function, module = load_function(config, "trainer", source)
    metrics = getattr(module, "METRICS", None)
    for metric in metric_names(config):
        if metrics and metric not in metrics:
            raise ConfigError(
                source,
                "study.optimization_metric",
                f"{metric!r} is not a metric of {config['study']['trainer']}",
                f"use one of {', '.join(metrics)}",
            )
    return function


def load_objective(config: Config, source: str = "config") -> Callable:
    """The plain Optuna objective(trial) of study.objective (or --objective)."""
    return load_function(config, "objective", source)[0]


CALLED_WITH = {"trainer": ("config", "trial"), "objective": ("trial",)}  # how the worker calls each


def load_function(config, key, source):
    """The user's function that study.<key> names, and its module: imported, and its signature checked."""
    spec = config["study"][key]
    try:
        module = trainer_module(config, key)
    except ConfigError:
        raise
    except OptimizeOnImport:
        raise ConfigError(
            source,
            f"study.{key}",
            f"importing {spec.partition(':')[0]!r} runs study.optimize()",
            "put the module's own study under if __name__ == '__main__':",
        ) from None
    except SyntaxError as e:
        where = f"{Path(e.filename or '?').name}, line {e.lineno}"
        raise ConfigError(
            source, f"study.{key}", f"cannot import {spec!r}: {e.msg} ({where})", f"correct the syntax at {where}"
        ) from None
    except Exception as e:  # ImportError, or a NameError inside the user's module
        raise ConfigError(
            source,
            f"study.{key}",
            f"cannot import {spec!r} ({type(e).__name__}: {e})",
            "name a package.module:function importable from the experiment's folder, where you submit, or PYTHONPATH",
        ) from None
    name = spec.partition(":")[2]
    if not hasattr(module, name):
        raise ConfigError(source, f"study.{key}", f"{spec!r} has no such function", "name a function of that module")
    function = getattr(module, name)
    wanted = f"def {name}({', '.join(CALLED_WITH[key])})"
    if not callable(function):
        raise ConfigError(source, f"study.{key}", f"{spec!r} is not a function", f"define {wanted}")
    try:
        inspect.signature(function).bind(*CALLED_WITH[key])
    except TypeError as e:
        raise ConfigError(
            source, f"study.{key}", f"{spec!r} cannot be called as {key} ({e})", f"define {wanted}"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): its call will tell
    return function, module


def prepare_data(config: Config, source: str = "config") -> None:
    """Let the trainer write its data once (optional `prepare(config)` in its module), then check it is there."""
    prepare = None if config["study"]["objective"] else getattr(trainer_module(config), "prepare", None)
    try:
        if prepare:
            prepare(dict(config))  # the user's settings only, as the trainer gets them
    except Exception as e:
        if isinstance(e, ConfigError) or full_filesystem(e):
            raise
        where = f"{config['study']['trainer'].partition(':')[0]}.prepare(config)"
        fix = "fix it, or the config keys it reads"
        raise ConfigError(source, "study.trainer", f"{where} failed ({type(e).__name__}: {e})", fix) from None
    data_dir = (config.get("data") or {}).get("dir")
    if isinstance(data_dir, str) and not Path(data_dir).is_dir():
        raise ConfigError(source, "data.dir", f"{data_dir} does not exist", "point data.dir at the experiment's data")


def resolve_config(config: Config, params: dict) -> dict:
    """A plain-dict copy of the settings with the sampled params written in and derived dimensions recomputed."""
    resolved = copy.deepcopy(dict(config))
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = resolved
        for part in parents:
            node = node[part]
        node[leaf] = value
    update = getattr(trainer_module(config), "update_config", None)
    return (update(resolved) or resolved) if update else resolved  # in place or returned, both work
