"""Submitting a study: check the inputs, take stock of the study, and submit the arrays it still needs."""

import os
import shutil
import sys
from pathlib import Path

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna import (
    checkpoints,
    config_versions,
    failures,
    liveness,
    ranks,
    slurm,
    study_control,
    submit_limits,
)
from parallel_optuna.array_file import (
    DEPENDENCY,
    array_size,
    sbatch_commands,
    sbatch_directives,
    storage_reference,
    submit_arrays,
    write_array_file,
)
from parallel_optuna.config import directions, metric_names, read_text, walltime_seconds
from parallel_optuna.jobs import submit_finish_job, submit_job, submit_next_part
from parallel_optuna.local import check_local, run_local
from parallel_optuna.optimizer import base_params, build_pruner, build_sampler
from parallel_optuna.options import (
    ConfigError,
)
from parallel_optuna.run_dir import run_dir, trusted_run_dir
from parallel_optuna.search_space import type_mismatches
from parallel_optuna.slurm import quote_command
from parallel_optuna.study import (
    mask_password,
    now,
    open_storage,
    open_study,
    remaining,
    storage_url,
    study_budget,
    yaml_budget,
)
from parallel_optuna.study_control import queued_tasks, study_jobs
from parallel_optuna.user_code import load_objective, load_trainer, prepare_data


def submit(args, config, argv=()):
    storage, url, data_dir = check_and_prepare(args, config)
    # A dry run creates a new study (the printed array can then be submitted with sbatch as it is), but
    # leaves an existing one as it is: no version adopted, no budget recorded, no trial retried.
    leave_as_is = not args.submit_jobs and args.local is None and exists(config, storage)
    study = open_study(config, storage, 0, config.path)
    config_versions.check_study(study, config)
    if study_control.mark(study) == study_control.PAUSED and args.local is not None:
        raise ConfigError(config.path, "study", "the study is paused", "resume it first (--resume)")
    use_budget(study, config)
    if leave_as_is:
        say_where_it_stands(study, config, url)
        use_throttle(study, config)
        if "n_trials" in config.overrides:
            print(f"note: a dry run records no budget: submit with --n_trials {config['study']['n_trials']} to set it")
    else:
        config_versions.adopt(config_versions.versions_folder(config), config, read_text(config.path))
        if args.next_part and failures.stopping(study, config):
            return stop_chaining(study, config)
        take_stock(study, config, url, reset_failures=not args.next_part)
        take_controls(study, config)
    storage_file = storage_reference(config, url)
    if args.local is not None:
        return run_local(args, config, study, storage_file)
    return submit_array(args, config, study, data_dir, storage_file, argv)


def check_and_prepare(args, config):
    """Everything that can be wrong is checked before a file is written or a study created."""
    url, storage = check_inputs(args, config)
    prepare_data(config, config.path)
    data_dir = stage_data(config) if args.cluster else None
    trusted_run_dir(config, args.group_access)  # created (or closed) once all passed
    storage = storage or open_storage(config, None, config.path)  # the journal file
    return storage, url, data_dir


def check_inputs(args, config):
    """The checks that need no data and write nothing: the URL and an opened storage (None: journal file)."""
    source = config.path
    if config["study"]["objective"]:
        load_objective(config, source)  # an import error fails here, not in every array task
    else:
        load_trainer(config, source)
    build_sampler(config, 0, source), build_pruner(config, source)
    if config["study"]["enqueue_base"]:
        base_params(config, source)
    if args.local is not None:
        check_local(args, config)
    if args.submit_jobs and args.local is None and not slurm.available("sbatch"):
        raise ConfigError(
            "sbatch",
            "(command)",
            "sbatch is not on PATH",
            "run on a SLURM login node, or use --local K or --no-submit_jobs",
        )
    if args.submit_jobs and args.local is None:
        check_request(config)
    if args.cluster:
        scratch_dir(config)
    trusted_run_dir(config, args.group_access, create=False)  # one there already: before anything is written
    url = storage_url(config)
    return url, open_storage(config, url, source) if url else None  # an unreachable server fails first


# Which key a refusal of `sbatch --test-only` most likely names, by words of SLURM's message.
REFUSED = [
    ("invalid account", "slurm.account"),  # "Invalid account or account/partition combination specified"
    ("qos", "slurm.qos"),  # "Job violates accounting/QOS policy" too: a QOS limit
    ("partition", "slurm.partition"),
    ("time limit", "slurm.walltime"),
    ("feature", "slurm.constraint"),
    ("gres", "slurm.gpus_per_task"),
    ("memory", "slurm.mem_per_cpu"),
    ("node configuration", "slurm.mem_per_cpu"),  # what slurmctld says of memory or CPUs no node has
]


def check_request(config):
    """Ask SLURM whether it could run one task as configured (`sbatch --test-only`), before any study exists."""
    flags = [line.removeprefix("#SBATCH ") for line in sbatch_directives(config["slurm"]).splitlines()]
    flags.append(f"--ntasks={config['slurm']['tasks_per_trial']}")
    problem = slurm.test_request(flags)
    if problem:
        key = next((key for words, key in REFUSED if words in problem.lower()), "slurm")
        raise ConfigError(
            config.path,
            key,
            f"sbatch refuses the request ({problem})",
            "ask for what the cluster has (sinfo -o '%P %l %m %c %G'), or --no-submit_jobs to write the array only",
        )


def stop_chaining(study, config):
    """The chained submit of a study whose trainer fails every trial: submitting more parts would only fail more."""
    submit_limits.record(study, remaining(study, config), "the trainer failed every trial since the last submit", None)
    print(
        f"error: {failures.describe(failures.stopping(study, config))}: the next part is not submitted; fix: fix the "
        "trainer, then submit again",
        file=sys.stderr,
    )
    return 1


def take_stock(study, config, url, reset_failures=True):
    """Say where the study stands, record the budget, and fail + retry trials whose workers died.

    A submit by hand lets trials start again after a failing streak; the chained next part does not."""
    say_where_it_stands(study, config, url)
    if reset_failures:
        if failures.stopping(study, config):
            print("note: the trainer failed every trial since the last submit; trials start again now", file=sys.stderr)
        study.set_user_attr(failures.RESET, now())
    if config["study"]["enqueue_base"] and not study.get_trials(deepcopy=False):
        study.enqueue_trial(base_params(config, config.path), user_attrs={attr.BASELINE: True})
        print("the YAML's own values are enqueued as the first trial (study.enqueue_base)")
    budget = study_budget(study, config)
    study.set_user_attr(attr.N_TRIALS, budget)  # what study_budget remembers for workers, status and later submits
    study.set_user_attr(attr.N_TRIALS_IN_YAML, yaml_budget(config))
    study.set_user_attr(attr.OPTIMIZATION_METRIC, config["study"]["optimization_metric"])
    if not (config["study"]["objective"] and "optimization_metric" in config.defaulted):  # else the objective's own
        study.set_metric_names(metric_names(config))  # Optuna's names: the dashboard and Optuna's plots show them
    failed = liveness.reconcile(study, config)
    if failed:
        print(f"trials {failed} had lost their workers: failed and re-enqueued")
    checkpoints.clean_and_say(study, config)  # after the budget is recorded: the clean judges by it
    ranks.remove_leftovers(config)  # the files between the processes of tasks that ended


def say_where_it_stands(study, config, url):
    print(
        f"study {study.study_name}: {len(study.get_trials(deepcopy=False))} trials so far, "
        f"storage {mask_password(url) if url else run_dir(config) / 'journal.log'}"
    )
    if url and url.startswith("sqlite"):
        print(
            "warning: SQLite may hand one retried trial to two workers at once; the journal file (default) "
            "or PostgreSQL never does",
            file=sys.stderr,
        )
    if config["study"]["objective"]:
        if config.get("search_space") or "trainer" not in config.defaulted:
            objective = config["study"]["objective"]
            print(f"note: study.objective {objective} runs; the YAML's trainer and search_space are not used")
    unset = [f"study.{key}" for key in ("optimization_metric", "optimization_direction") if key in config.defaulted]
    if unset and config["study"]["objective"] or "optimization_direction" in config.defaulted:
        goals = ", ".join(f"{d} {m}" for d, m in zip(directions(config), metric_names(config), strict=True))
        print(f"note: {config.path}: no {' nor '.join(unset)}: the study will {goals}", file=sys.stderr)
    if not config["study"]["objective"] and not config.get("search_space"):
        once = "" if config["study"]["allow_repeats"] else ", trained once, the other trials answered from it"
        print(f"warning: {config.path}: search_space is empty: one config{once}", file=sys.stderr)
    for mismatch in type_mismatches(config):
        print(f"warning: {config.path}: {mismatch}", file=sys.stderr)
    if config["slurm"]["gpu_type"] and not config["slurm"]["gpus_per_task"]:
        print(f"note: slurm.gpu_type {config['slurm']['gpu_type']} is not asked for: slurm.gpus_per_task is 0")
    if config["study"]["sampler"].get("name") == "GridSampler":
        print(
            "warning: GridSampler: parallel workers may train the same grid point twice (optuna#4627)",
            file=sys.stderr,
        )


def exists(config, storage):
    return config["study"]["study_name"] in optuna.get_all_study_names(storage)


def use_budget(study, config):
    """Say the budget in force (study.study_budget) when it is not the YAML's; take_stock records it."""
    before, budget, in_yaml = study.user_attrs.get(attr.N_TRIALS), study_budget(study, config), yaml_budget(config)
    if budget == before and budget != in_yaml and "n_trials" not in config.overrides:
        print(f"budget: {budget} finished trials, the last --n_trials (the YAML says {in_yaml})")
    if before is not None and before != budget:
        print(f"budget: {before} -> {budget} finished trials")


def use_throttle(study, config):
    """The throttle in force: --max_concurrent_jobs, else the last --throttle, else the YAML's."""
    slurm_keys = config["slurm"]
    if "max_concurrent_jobs" not in config.overrides:
        slurm_keys["max_concurrent_jobs"] = study.user_attrs.get(
            attr.MAX_CONCURRENT_JOBS, slurm_keys["max_concurrent_jobs"]
        )


def take_controls(study, config):
    """At a (re)submission: the throttle in force and the trials stopped by hand (study_control.py)."""
    if "max_concurrent_jobs" in config.overrides:
        study.set_user_attr(attr.MAX_CONCURRENT_JOBS, config["slurm"]["max_concurrent_jobs"])
    use_throttle(study, config)
    retried = study_control.resume_stopped(study, study_budget(study, config))
    if retried:
        print(f"trials {retried} were stopped by hand: they continue from their checkpoints as linked retries")


def submit_array(args, config, study, data_dir, storage_file, argv=()):
    """Render the array file for the trials still missing and submit it (or print it: dry run)."""
    tasks = liveness.squeue_tasks(study_jobs(study))
    per_task, throttle = config["slurm"]["trials_per_task"], config["slurm"]["max_concurrent_jobs"]
    queued = queued_tasks(study, tasks)
    missing = remaining(study, config) - queued * per_task  # a queued task will run up to per_task trials
    n_tasks = array_size(missing, per_task, throttle) if missing > 0 else 0
    script = write_array_file(config, max(n_tasks, 1), data_dir, storage_file)
    if missing <= 0:
        print(
            f"budget met: {study_budget(study, config)} trials finished, running or queued ({queued} tasks "
            f"waiting); nothing to submit (raise --n_trials to extend the study)"
        )
        if args.submit_jobs:
            submit_limits.record(study, 0, None, None)
        return 0
    # %K holds per array: a top-up starts once the study's arrays still in the queue have ended, so that
    # the study never runs more than K tasks at once.
    active = sorted({key.split("_")[0] for key in tasks or {}})
    if active:
        print(f"the study's array(s) {', '.join(active)} still run: the new array waits for them (%K is per array)")
    warn_if_the_walltime_cannot_hold(study, config)
    if not args.submit_jobs:
        return dry_run(script, sbatch_commands(script, n_tasks, slurm.DEFAULT_MAX_ARRAY_SIZE, throttle, active))
    room = submit_limits.tightest(config)
    now_tasks = submit_limits.tasks_now(n_tasks, room, extra_jobs=int(config["slurm"]["notify_on_finish"]))
    if now_tasks == 0:
        submit_limits.record(study, n_tasks, room.limit, None)
        raise slurm.SlurmError(
            f"no room for the array under the {room.limit}; fix: submit again once some of your jobs have ended"
        )
    commands = sbatch_commands(script, now_tasks, slurm.max_array_size(), throttle, active)
    if study_control.mark(study) == study_control.PAUSED:
        commands = [(n, [c[0], "--hold", *c[1:]]) for n, c in commands]
        print("the study is paused: the new tasks wait, held, until --resume")
    code = submit_arrays(study, config, commands)
    if code == 0 and now_tasks < n_tasks:
        return chain_the_rest(study, config, argv, storage_file, n_tasks - now_tasks, room.limit)
    submit_limits.record(study, 0, None, None)
    if code == 0 and config["slurm"]["notify_on_finish"]:
        submit_finish_job(study, config)
    return code


def dry_run(script, commands):
    print(script.read_text())
    shown = [quote_command([w + "<previous job id>" if w == DEPENDENCY else w for w in c]) for _, c in commands]
    print("dry run, nothing submitted; to submit:\n  " + "\n  ".join(shown))
    return 0


def chain_the_rest(study, config, argv, storage_file, rest, limit):
    """A submit limit held `rest` tasks back: a job submits them once this study's arrays have ended."""
    job = submit_next_part(config, argv, storage_file, sorted(study_control.queued_arrays(study)))
    submit_limits.record(study, rest, limit, job)
    print(submit_limits.status_line(study))
    return 0 if job else 1


def warn_if_the_walltime_cannot_hold(study, config):
    """slurm.trials_per_task N: say so when N trials of the study's mean duration outlast a task's walltime."""
    per_task, slurm_keys = config["slurm"]["trials_per_task"], config["slurm"]
    took = [
        t.user_attrs[attr.TRAIN_SECONDS] for t in study.get_trials(deepcopy=False) if attr.TRAIN_SECONDS in t.user_attrs
    ]
    if per_task == 1 or not took:
        return
    mean, usable = sum(took) / len(took), walltime_seconds(slurm_keys["walltime"]) - slurm_keys["signal_grace"]
    if per_task * mean > usable:
        print(
            f"warning: {config.path}: slurm.trials_per_task {per_task} trials of the study's mean {mean:.0f} s "
            f"outlast the walltime less signal_grace ({usable} s): a task's last trials are requeued; "
            f"lower trials_per_task to {max(1, int(usable // mean))} or raise slurm.walltime",
            file=sys.stderr,
        )


def stage_data(config):
    source, target = scratch_dir(config)
    shutil.copytree(source, target, dirs_exist_ok=True)
    print(f"data staged: {source} -> {target}")
    return target


def scratch_dir(config):
    """(data.dir, where --cluster stages it)."""
    scratch = config["slurm"]["scratch"] or os.environ.get("SCRATCH")
    if not scratch:
        raise ConfigError(
            config.path,
            "slurm.scratch",
            "--cluster needs a scratch directory",
            "set $SCRATCH, pass --scratch DIR or set slurm.scratch",
        )
    source = (config.get("data") or {}).get("dir")
    if not source:
        raise ConfigError(
            config.path,
            "data.dir",
            "--cluster stages data.dir, which is not set",
            "set data.dir to the experiment's data directory",
        )
    return source, Path(scratch).expanduser() / config["study"]["study_name"] / "data"


def submit_as_job(args, config, argv):
    """--as_job: check everything here, then a small job runs this same command without --as_job."""
    check_inputs(args, config)
    name = config["study"]["study_name"]
    script = submit_job(config, argv, storage_reference(config, storage_url(config)))
    if not args.submit_jobs:
        print(script.read_text() + f"dry run, nothing submitted; to submit:\n  sbatch {script}")
        return 0
    job = slurm.run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    print(
        f"submitted job {job}: it submits the array of study {name}\n"
        f"  squeue --me --jobs={job}\n  cat {run_dir(config)}/slurm_logs/optuna_submit_{name}_{job}.out"
    )
    return 0
