"""Which version of the experiment YAML a running study uses, and which edits it may take.

Workers read the YAML fresh for every trial, so that a user can change a study while it runs. A
save that breaks the file (a syntax error mid-edit, an editor that truncates before it writes)
must not end the array. So every valid version is kept in runs/<study>/config_versions/:

    <version>.yaml   the YAML's text; <version> is a short hash of what it says (comments aside)
    current.json     the version in force and when it was adopted
    problem.json     while the file on disk cannot be used: since when, and why

A worker adopts what it reads only when the file has stopped changing, is valid, keeps every key
the version in force had (a truncated file can still parse), and changes nothing a running study
cannot change (the metric, the direction, where the study lives, how its params are sampled:
see unsafe_changes). Otherwise it goes on with the version in force and says why, in its log and
in status. submit_study.py adopts any valid version the stored study can take, lost keys and all:
submitting is the user saying so. A trial keeps the version it started with when it resumes after
a requeue or continues as a retry, because its checkpoint's shapes depend on it.
"""

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

from parallel_optuna import attributes as attr
from parallel_optuna.config import directions, load_config, parse_yaml, read_text
from parallel_optuna.options import ConfigError
from parallel_optuna.run_dir import run_dir, run_subdir, trusted_run_dir
from parallel_optuna.storage.journal_lock import MAX_CLOCK_SKEW_S
from parallel_optuna.study import mask_password, now

log = logging.getLogger("config")
FOLDER = "config_versions"
SETTLE_S = 1.0  # a file modified more recently than this may still be being written
SETTLE_TIMEOUT_S = 15.0
# What a study already running cannot change: its trials and storage were made with these.
# (study_name and runs_dir: the array command passes them as flags, so an edit cannot move a running array.)
FIXED = ("optimization_metric", "optimization_direction", "storage")


# ---------------------------------------------------------------- reading the YAML
def load(path, overrides, worker=False):
    """The config to use now: the YAML on disk if it can be adopted, else the version in force.

    A worker waits for the file to settle, adopts what it can and records what it cannot; status
    and export only read. The versions are found without the YAML through the flags (the array
    command carries --study_name and --runs_dir), else in their default place beside the YAML.
    """
    folder = default_folder(path, overrides)
    try:
        in_force = (current(folder) or {}).get("version") if folder else None
        text = read_settled(path, in_force=in_force) if worker else read_text(path)
        read_as = signature(path) if worker else None  # only a worker adopts
        config = load_config(path, overrides, text)
    except ConfigError as e:
        return fall_back(folder, path, overrides, str(e), worker, error=e)
    trusted_run_dir(config, reading=not worker, create=False)  # before a version kept in it is read
    folder = versions_folder(config)
    in_force = current(folder)
    if in_force:
        old = at_version(in_force["version"], path, overrides, folder)
        problems = (unsafe_changes(old, config) + lost_keys(old, config)) if old else []
        if problems:
            return fall_back(folder, path, overrides, f"{path}: {problems[0]}", worker)
    if worker:
        adopt(folder, config, text, read_as)
    return config


def fall_back(folder, path, overrides, problem, record, error=None):
    """Go on with the version in force, and leave the problem where status shows it."""
    in_force = current(folder) if folder else None
    config = at_version(in_force["version"], path, overrides, folder) if in_force else None
    if config is None:
        raise error or ConfigError(str(path), "(file)", problem, "correct the YAML")
    if record:
        note_problem(folder, problem)
    log.warning("%s; using the version of %s (%s)", problem, in_force["adopted_at"], in_force["version"])
    return config


def read_settled(path, settle=SETTLE_S, timeout=SETTLE_TIMEOUT_S, in_force=None):
    """The file's text once it has stopped changing: an editor may be half-way through writing it.

    A file whose mtime is far from this machine's clock was written long ago. One written recently (or
    stamped by a file server whose clock runs ahead or behind ours) is read once its (mtime, size) has
    not changed for `settle` seconds, timed on this machine's monotonic clock, never against the mtime.
    A text that says what the version `in_force` says is used at once: there is nothing new to adopt, and
    every array task started in the minutes after a submit would otherwise wait `settle` seconds.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    seen, since = None, time.monotonic()
    while True:
        try:
            before = path.stat()
        except OSError:
            return read_text(path)  # the one-line error for a missing file
        text = read_text(path)
        after = path.stat()
        now, stamp = time.monotonic(), (after.st_mtime_ns, after.st_size)
        if stamp != (before.st_mtime_ns, before.st_size) or stamp != seen:
            seen, since = stamp, now
        old = abs(time.time() - after.st_mtime) > settle + MAX_CLOCK_SKEW_S
        if old and since == now or now - since >= settle or now > deadline or says(text, in_force):
            return text
        time.sleep(settle / 4)


def says(text, version):
    """Whether the text is the given version of the YAML (False for a text that does not parse)."""
    try:
        return version is not None and version_of(text) == version
    except ConfigError:
        return False


def version_of(text, source="config"):
    """A short hash of what the YAML says: the same settings give the same version, comments aside."""
    said = json.dumps(parse_yaml(text, source), sort_keys=True, default=str)
    return hashlib.sha256(said.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the versions folder
def versions_folder(config):
    return run_dir(config) / FOLDER


def default_folder(path, overrides):
    """Where the versions are when the YAML cannot say: the flags' run directory, else the one
    study beside the YAML (runs/<study>/) whose versions came from this file."""
    base = Path(path).resolve().parent
    runs = base / os.path.expandvars(os.path.expanduser(overrides.get("runs_dir") or "runs"))
    if overrides.get("study_name"):
        return runs / overrides["study_name"] / FOLDER
    here = str(Path(path).resolve())
    mine = [f.parent for f in runs.glob(f"*/{FOLDER}/current.json") if (current(f.parent) or {}).get("path") == here]
    return mine[0] if len(mine) == 1 else None


def current(folder):
    """{"version", "adopted_at"} of the version in force, or None before the first one."""
    try:
        return json.loads((Path(folder) / "current.json").read_text())
    except (OSError, ValueError):
        return None


def at_version(version, path, overrides, folder):
    """The config as the given version says, or None when that version is not kept."""
    try:
        text = (Path(folder) / f"{version}.yaml").read_text()
        config = load_config(path, overrides, text)
    except (OSError, ConfigError):
        return None
    config.version = version
    return config


def adopt(folder, config, text, read_as=None):
    """Keep this valid version and make it the one in force.

    `read_as` is the file's signature when `text` was read: a worker that read a good file just
    before a bad save must not clear the problem another worker has since recorded.
    """
    version = version_of(text)
    config.version = version
    trusted_run_dir(config)  # a worker may come before any submit
    run_subdir(config, FOLDER)
    kept = folder / f"{version}.yaml"
    if not kept.exists():
        write_atomic(kept, text)
    in_force = current(folder)
    if not in_force or in_force["version"] != version:
        in_force_now = {"version": version, "adopted_at": now(), "path": config.path}
        write_atomic(folder / "current.json", json.dumps(in_force_now))
        if in_force:
            log.info("config version %s adopted (was %s)", version, in_force["version"])
    if read_as is None or signature(config.path) == read_as:
        (folder / "problem.json").unlink(missing_ok=True)


def signature(path):
    """(mtime, size) of the file: it changes with every save."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def note_problem(folder, problem):
    """Record since when the file on disk cannot be used; the first time counts."""
    marker = Path(folder) / "problem.json"
    try:
        since = json.loads(marker.read_text())["since"]
    except (OSError, ValueError, KeyError):
        since = now()
    write_atomic(marker, json.dumps({"since": since, "problem": problem}))


def write_atomic(path, text):
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")  # unique across nodes, where pids are not
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------- what may change
def unsafe_changes(old, new):
    """What `new` changes that a study already run with `old` cannot take."""
    problems = [
        mask_password(
            f"study.{key} changed from {old['study'][key]!r} to {new['study'][key]!r}, which a running study "
            "cannot take"
        )
        for key in FIXED
        if old["study"][key] != new["study"][key]
    ]
    old_space, new_space = old.get("search_space") or {}, new.get("search_space") or {}
    for name in sorted(set(old_space) & set(new_space)):
        if sampling_kind(old_space[name]) != sampling_kind(new_space[name]):
            problems.append(
                f"search_space.{name} changes how it is sampled ({sampling_kind(old_space[name])} -> "
                f"{sampling_kind(new_space[name])}), which Optuna cannot mix with the study's earlier trials"
            )
    return problems


def sampling_kind(spec):
    """What Optuna cannot change for a param once trials have it: int/float/categorical, log, the choices."""
    if spec["type"] == "categorical":
        return ("categorical", tuple(spec["choices"]))
    return (spec["type"], bool(spec.get("log")))


def distribution_kind(distribution):
    """sampling_kind() of a distribution stored with a trial."""
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return ("categorical", tuple(distribution.choices))
    return ("int" if isinstance(distribution, d.IntDistribution) else "float", bool(distribution.log))


def lost_keys(old, new):
    """Keys the version in force had that this one lacks: a file cut short can still be valid YAML."""
    gone = sorted(dotted_keys(old) - dotted_keys(new))
    if not gone:
        return []
    lost_space = "search_space" in gone and not (new.get("study") or {}).get("objective")
    advice = "restore search_space: submit refuses the file without it" if lost_space else "submit to adopt it"
    return [f"lacks {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''} (maybe saved half-way); {advice}"]


def dotted_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.add(name)
        if isinstance(value, dict) and name != "search_space":
            keys |= dotted_keys(value, f"{name}.")
    return keys | {f"search_space.{k}" for k in (config.get("search_space") or {}) if not prefix}


def check_study(study, config):
    """submit_study.py: refuse a YAML that contradicts the study stored under the same name."""
    source, settings = config.path, config["study"]
    wanted, stored = directions(config), [d.name.lower() for d in study.directions]
    if wanted != stored:
        raise ConfigError(
            source,
            "study.optimization_direction",
            f"{' and '.join(wanted)}, but study {study.study_name!r} was created to {' and '.join(stored)}",
            "restore it, or choose a new study_name for a new study",
        )
    metric = study.user_attrs.get(attr.OPTIMIZATION_METRIC)
    if metric and metric != settings["optimization_metric"]:
        raise ConfigError(
            source,
            "study.optimization_metric",
            f"{settings['optimization_metric']!r}, but study {study.study_name!r} optimizes {metric!r}",
            "restore it, or choose a new study_name for a new study",
        )
    stored_space = {}
    for trial in study.get_trials(deepcopy=False):
        stored_space.update(trial.distributions)
    if stored_space and not config.get("search_space") and not settings["objective"]:
        raise ConfigError(
            source,
            "search_space",
            f"is missing, but study {study.study_name!r} samples {len(stored_space)} params (a save cut short?)",
            "restore search_space, or choose a new study_name for a study without one",
        )
    for name, spec in (config.get("search_space") or {}).items():
        if name in stored_space and distribution_kind(stored_space[name]) != sampling_kind(spec):
            raise ConfigError(
                source,
                f"search_space.{name}",
                f"{sampling_kind(spec)} differs from the study's trials {distribution_kind(stored_space[name])}",
                "restore type, log and choices (ranges may change), or choose a new study_name",
            )


def status_lines(config, trials):
    """What status says about versions: a problem with the file on disk, and which trials ran which version."""
    folder = versions_folder(config)
    lines = []
    in_force = current(folder)
    try:
        problem = json.loads((folder / "problem.json").read_text())
    except (OSError, ValueError):
        problem = None
    if problem and in_force:
        lines.append(
            f"warning: {config.path} on disk cannot be used since {problem['since']} "
            f"({problem['problem']}); workers use the version of {in_force['adopted_at']} ({in_force['version']})"
        )
    ran = {}
    for t in trials:
        if t.user_attrs.get(attr.CONFIG_VERSION):
            ran.setdefault(t.user_attrs[attr.CONFIG_VERSION], []).append(t.number)
    if len(ran) > 1 or (ran and in_force and in_force["version"] not in ran):
        for version, numbers in ran.items():
            mark = "  (in force)" if in_force and version == in_force["version"] else ""
            lines.append(f"  config {version}: trials {compact(numbers)}{mark}")
    return lines


def compact(numbers):
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs, numbers = [], sorted(numbers)
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def pinned(trial, config, overrides):
    """The config version a trial that resumes, or continues as a retry, started with; `config` where that is
    today's or is not kept.

    Its study section is today's, the trainer aside: the budget, retries and requeues are the study's,
    not the trial's, and study_budget must answer the same for every trial of the study.
    """
    version = trial.user_attrs.get(attr.CONFIG_VERSION)
    if not version or version == config.version:
        return config
    folder = versions_folder(config)
    kept = at_version(version, config.path, overrides, folder)
    if kept is None:
        log.warning("trial %d: its config version %s is not kept in %s; using today's", trial.number, version, folder)
        return config
    log.info("trial %d keeps its config version %s", trial.number, version)
    kept["study"] = {**config["study"], "trainer": kept["study"]["trainer"]}
    kept.in_yaml, kept.overrides, kept.defaulted = config.in_yaml, config.overrides, config.defaulted
    return kept
