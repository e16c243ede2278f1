"""--export_best: the best trial (or a Pareto member) as a YAML that retrains it, and its weights."""

import copy
import re
from pathlib import Path

import yaml

from parallel_optuna import artifacts, checkpoints
from parallel_optuna import attributes as attr
from parallel_optuna.config import metric_names, read_yaml
from parallel_optuna.optimizer import values_text
from parallel_optuna.options import (
    ConfigError,
)
from parallel_optuna.study import best_trial, now
from parallel_optuna.user_code import resolve_config


def export_best(study, config, path, number=None):
    """best_trial.yaml: a complete experiment YAML for retraining the best trial (or trial `number`),
    plus its results. With several objectives, the Pareto front: every member, each retrainable."""
    source = config.path
    if number is not None:
        chosen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if chosen is None or chosen.state.name != "COMPLETE":
            raise ConfigError(source, "--trial", f"trial {number} is no COMPLETE trial", "name a COMPLETE trial")
        members = [chosen]
    else:
        members = [best_trial(study)] if len(study.directions) == 1 else study.best_trials
    if not members or members[0] is None:
        raise ConfigError(source, "study", "no COMPLETE trial yet", "wait for a trial to finish")
    target = export_target(config, path, number, study.study_name)
    if len(members) == 1 and (number is not None or len(study.directions) == 1):
        exported = retrainable(study, config, members[0], target.with_suffix(".pt"))
        retrain = "python worker.py --config {target}"
    else:
        front = [retrainable(study, config, t, target.with_suffix(f".{t.number}.pt")) for t in members]
        exported = {"pareto_front": front}
        retrain = 'make best ARGS="--trial <number>", then python worker.py --config trial_<number>.yaml'
    which = "Best trial(s)" if number is None else f"Trial {number}"
    header = (
        f"# {which} of study {study.study_name}: the full resolved config (base YAML + sampled params +\n"
        f"# derived dimensions). Retrain: {retrain.format(target=target)}\n"
    )
    write_export(target, header + yaml.safe_dump(exported, sort_keys=False))
    shown = ", ".join(f"{t.number} ({values_text(config, t.values, study)})" for t in members[:5])
    what = "best trial" if number is None else "trial"
    print(f"{what if len(members) == 1 else f'{len(members)} Pareto-optimal trials'} {shown} -> {target}")
    checkpoints.clean_and_say(study, config)
    return 0


def retrainable(study, config, trial, weights_target):
    """One trial as an experiment YAML that retrains it (a new study of one trial), with its results."""
    trained = Path(trial.user_attrs.get(attr.CONFIG_PATH, "-"))
    # The config the trial trained with; if its file is gone, today's YAML with the trial's params.
    if trained.is_file():
        resolved = read_yaml(trained.read_text())
    else:  # a plain objective's params are suggested by the objective again (best_trial.params)
        resolved = copy.deepcopy(dict(config)) if config["study"]["objective"] else resolve_config(config, trial.params)
    resolved.pop("best_trial", None)  # the trial may itself be a retrain of an export
    resolved["study"].update(
        study_name=f"{study.study_name}_best{trial.number}", n_trials=1, storage=None, pruner={"name": "NopPruner"}
    )
    names = metric_names(config, study)
    if config["study"]["objective"]:  # the objective suggests its own params; the export names no trainer
        resolved["study"]["optimization_metric"] = names[0] if len(names) == 1 else list(names)  # a copy: no anchors
        resolved["study"].pop("trainer", None)
        resolved.pop("search_space", None)
    else:
        resolved["search_space"] = {}
    results = {
        "study_name": study.study_name,
        "number": trial.number,
        "metric": names[0] if len(names) == 1 else names,
        "direction": config["study"]["optimization_direction"],
        "value": trial.values if len(trial.values) > 1 else trial.value,
        "params": trial.params,
        "metrics": trial.user_attrs.get(attr.METRICS, {}),
        "weights": export_weights(config, trial, weights_target),
        "artifacts": artifacts.readable_artifacts(study, config, trial),  # {id: file name}, in the run's store
        "exported_at": now(),
    }
    return {"best_trial": copy.deepcopy(results), **resolved}  # copies: the front's members share no YAML anchors


def export_target(config, path, number, study_name):
    target = Path(path or config.dir)
    if target.is_dir() or path.endswith("/") or not path:
        name = "best_trial" if number is None else f"trial_{number}"
        target = target / f"{name}.yaml"
        if exported_study(target) not in (None, study_name):  # another study's export, from the same folder
            target = target.with_name(f"{name}_{study_name}.yaml")
    return target


def exported_study(target):
    """The study an earlier export at target came from (its first line says), else None."""
    try:
        with open(target) as f:
            match = re.match(r"# .* of study (\S+):", f.readline())
    except OSError:
        return None
    return match.group(1) if match else None


def write_export(target, text):
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as e:
        raise cannot_write(target, e) from None


def cannot_write(target, error):
    return ConfigError(str(target), "--export_best", f"cannot write it ({error.strerror})", "name a writable path")


def export_weights(config, trial, target):
    """best_trial.pt beside best_trial.yaml: the trial's saved weights, else its last checkpoint."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source = checkpoints.export_weights(config, trial.number, target)
    except OSError as e:
        raise cannot_write(target, e) from None
    if source is None:
        print(f"trial {trial.number} left no weights.pt nor checkpoint.pt: only its config is exported")
        return None
    print(f"trial {trial.number}'s {source.name} -> {target}")
    return str(target)
