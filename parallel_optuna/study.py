"""The study: its storage, its budget, and what its trials add up to."""

from __future__ import annotations

import copy
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from parallel_optuna import attributes as attr
from parallel_optuna.config import directions
from parallel_optuna.optimizer import build_pruner, build_sampler
from parallel_optuna.options import ConfigError
from parallel_optuna.run_dir import run_dir, trusted_run_dir
from parallel_optuna.storage import journal

if TYPE_CHECKING:  # names for the hints only: importing them would make a cycle
    from parallel_optuna.config import Config

# Heartbeats and fail_stale_trials are marked experimental; they are what Optuna offers for dead workers.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def storage_url(config: Config, storage_file: str | None = None) -> str | None:
    """Where the study lives; None means the journal file in the run directory.

    A --storage_file (written by submit_study.py for a URL given by flag or environment) comes first,
    then the --storage flag or the YAML's study.storage, then $OPTUNA_STORAGE as Optuna's CLI does.
    """
    if storage_file:
        try:
            return Path(storage_file).read_text().strip()
        except OSError as e:
            raise ConfigError(
                storage_file,
                "--storage_file",
                f"cannot read it ({e.strerror})",
                "submit again so that submit_study.py writes it",
            ) from None
    return config["study"]["storage"] or os.environ.get("OPTUNA_STORAGE")


DRIVERS = {
    "postgresql": "psycopg2-binary",
    "postgresql+psycopg2": "psycopg2-binary",
    "postgresql+psycopg": "'psycopg[binary]'",
    "mysql+pymysql": "PyMySQL",
}


def open_storage(config: Config, url: str | None = None, source: str = "config", reading: bool = False) -> BaseStorage:
    if not url:
        return journal.open_journal(trusted_run_dir(config, reading=reading) / "journal.log")
    if url.startswith("sqlite:///") and "timeout=" not in url:
        url += ("&" if "?" in url else "?") + "timeout=60"  # the 5 s default loses trials under load
    settings = config["study"]
    try:
        if url.split(":")[0].split("+")[0] in ("sqlite", "postgresql", "mysql"):
            # Optuna's heartbeats for RDB storages; liveness.fail_stale fails and retries the stale trials.
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=settings["heartbeat_interval"], grace_period=settings["grace_period"]
            )
        return optuna.storages.get_storage(url)
    except Exception as e:  # any driver error: unreachable, bad URL, missing driver
        why = mask_password((str(e).splitlines() or [""])[0])
        driver = DRIVERS.get(url.split(":")[0]) if isinstance(e, ImportError) else None
        folder = Path(url.split("?")[0][len("sqlite:///") :]).parent if url.startswith("sqlite:///") else None
        if driver:
            fix = f"pip install {driver}"
        elif folder and not folder.is_dir():
            fix = f"create the folder {folder} (mkdir -p), or point the URL at an existing one"
        else:
            fix = "check the URL, the server and its driver"
        raise ConfigError(
            source, "study.storage", f"cannot open {mask_password(url)} ({type(e).__name__}: {why})", fix
        ) from None


def open_study(config: Config, storage: BaseStorage, seed_offset: int = 0, source: str = "config") -> optuna.Study:
    return optuna.create_study(
        storage=storage,
        study_name=config["study"]["study_name"],
        directions=directions(config),
        sampler=build_sampler(config, seed_offset, source),
        pruner=build_pruner(config, source),
        load_if_exists=True,
    )


URL = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>]*")
SECRET_QUERY = re.compile(r"([?&;](?:password|passwd)=)[^&;#]*", re.IGNORECASE)


def mask_password(text: str | None) -> str:
    """Every URL in text (a URL, or an error message holding one) with its credentials hidden.

    The one mask for whatever prints or logs a storage URL. Everything between '://' and the last '@'
    goes (user and password: a password may hold a raw '@', '/' or '?'), and so do the values of the
    query keys password and passwd. SQLAlchemy's own rendering shows the part of a password after a
    raw '@' and leaves ?password= as it is.
    """
    return URL.sub(lambda found: _mask_url(found.group(0)), text or "")


def _mask_url(url):
    scheme, _, rest = url.partition("://")
    at = -1 if rest.startswith("/") else rest.rfind("@")  # sqlite:///path: no credentials, maybe an '@'
    if at >= 0:
        rest = "***" + rest[at:]
    return f"{scheme}://{SECRET_QUERY.sub(lambda m: m.group(1) + '***', rest)}"


def without_credentials(settings: dict) -> dict:
    """A copy of the settings to write beside the trial (config.yaml): study.storage masked."""
    copied = copy.deepcopy(dict(settings))
    study = copied.get("study")
    if isinstance(study, dict) and study.get("storage"):
        study["storage"] = mask_password(study["storage"])
    return copied


def yaml_budget(config: Config) -> int:
    """The YAML's own n_trials, whatever --n_trials says."""
    return config.in_yaml.get("n_trials", config["study"]["n_trials"])


def study_budget(study: optuna.Study, config: Config) -> int:
    """The study's budget: the one number every "enough trials?" asks (claims, retries, cleaning, status, submit).

    --n_trials when given; else the YAML's n_trials if it was edited since the last submission; else the
    last submission's, which the study remembers (a budget raised by the flag stays). A study never
    submitted has the YAML's.
    """
    last, last_in_yaml = study.user_attrs.get(attr.N_TRIALS), study.user_attrs.get(attr.N_TRIALS_IN_YAML)
    if "n_trials" in config.overrides or last is None:
        return config["study"]["n_trials"]
    if last_in_yaml is not None and yaml_budget(config) != last_in_yaml:
        return yaml_budget(config)
    return last


def still_to_run(trials: list[FrozenTrial], budget: int) -> int:
    """The budget less the trials finished or running: what workers still have to do (WAITING retries included)."""
    return max(0, budget - sum(t.state in FINISHED or t.state == optuna.trial.TrialState.RUNNING for t in trials))


def count_states(trials: list[FrozenTrial]) -> dict[str, int]:
    counts = {state.name: 0 for state in optuna.trial.TrialState}
    for trial in trials:
        counts[trial.state.name] += 1
    return counts


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def remaining(study: optuna.Study, config: Config) -> int:
    return still_to_run(study.get_trials(deepcopy=False), study_budget(study, config))


def open_existing_study(config: Config, reading: bool = True) -> optuna.Study:
    """The submitted study, for status and export; creates nothing. `reading`: a teammate's run directory will do."""
    trusted_run_dir(config, reading=reading, create=False)
    name, saved_url = config["study"]["study_name"], run_dir(config) / "storage_url"
    url = storage_url(config) or (storage_url(config, saved_url) if saved_url.exists() else None)
    if not url and not (run_dir(config) / "journal.log").exists():
        raise ConfigError(
            config.path,
            "study.study_name",
            f"no study {name!r} in {run_dir(config)}",
            "submit it first, or pass the --study_name it was submitted with",
        )
    storage = open_storage(config, url, config.path, reading)
    if name not in optuna.get_all_study_names(storage):  # summaries would deep-copy every trial
        raise ConfigError(
            config.path,
            "study.study_name",
            f"no study {name!r} in the storage",
            "submit it first, or pass the --study_name it was submitted with",
        )
    return optuna.load_study(study_name=name, storage=storage)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best trial of a single-objective study; None before the first COMPLETE or with several objectives."""
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None
