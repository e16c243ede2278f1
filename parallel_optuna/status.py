"""--status: the study's trials, budget, best so far, running trials and SLURM tasks."""

import time
from datetime import datetime

from parallel_optuna import attributes as attr
from parallel_optuna import (
    checkpoints,
    config_versions,
    failures,
    liveness,
    repeats,
    study_control,
    submit_limits,
    task_ends,
)
from parallel_optuna.optimizer import describe_sampler, values_text
from parallel_optuna.run_dir import run_dir
from parallel_optuna.study import (
    FINISHED,
    best_trial,
    count_states,
    remaining,
    study_budget,
)
from parallel_optuna.study_control import queued_tasks, study_jobs


def show_status(study, config):
    jobs = study_jobs(study)
    tasks = liveness.squeue_tasks(jobs)
    judged_dead = liveness.reconcile(study, config, tasks)
    trials = study.get_trials(deepcopy=False)
    print_judged_dead(trials, judged_dead)
    counts = count_states(trials)
    budget = study_budget(study, config)
    finished = counts["COMPLETE"] + counts["PRUNED"]
    print(f"study {study.study_name}: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"progress {progress_bar(finished, budget)} {finished}/{budget} finished")
    concurrency = study.user_attrs.get(attr.MAX_CONCURRENT_JOBS, config["slurm"]["max_concurrent_jobs"])
    # None when unknown: squeue failed, or no array is known yet (one submitted by hand shows once it runs)
    queued = queued_tasks(study, tasks)
    workers = None if tasks is None or not jobs else queued + counts["RUNNING"]
    print(eta_line(trials, budget, concurrency, study_control.mark(study), workers))
    for line in config_versions.status_lines(config, trials) + repeats.status_lines(config, trials):
        print(line)
    print(f"sampler: {describe_sampler(config)}")
    print_best(study, config, counts)
    print_running(study, trials)
    failed = [t for t in trials if t.state.name == "FAIL"]
    for t in failed[-10:]:
        reason = t.user_attrs.get(attr.FAIL_REASON, "no heartbeat within grace_period (worker died)")
        print(f"  trial {t.number} FAIL: {' '.join(reason.split())}")
    if jobs:
        print_slurm_tasks(study, config, trials, tasks)
    streak = failures.stopping(study, config, trials)
    if streak:
        print(
            f"{failures.describe(streak)}: array tasks start no new trial until a submit or an edit of the YAML "
            "or the trainer's file"
        )
    print_top_up(remaining(study, config) - queued, failed, streak, submit_limits.status_line(study, ask_slurm=True))
    print(disk_line(study, config))
    return 0


def print_judged_dead(trials, numbers):
    """Status writes one thing: the trials whose worker is gone are failed, and retried. It says which, and why."""
    for number in numbers:
        retry = next((t.number for t in trials if t.user_attrs.get(attr.RETRY_OF) == number), None)
        then = f"its retry is trial {retry}" if retry is not None else "no retry left (study.max_retries)"
        print(
            f"marked trial {number} FAIL ({trials[number].user_attrs.get('fail_reason', 'its worker is gone')}); {then}"
        )


def print_best(study, config, counts):
    best = best_trial(study)
    if best:
        print(f"best: trial {best.number}  {values_text(config, best.values, study)}  params {best.params}")
    elif len(study.directions) > 1 and counts["COMPLETE"]:
        front = study.best_trials
        print(f"Pareto front: {len(front)} trial(s)")
        for t in front[:10]:
            print(f"  trial {t.number}  {values_text(config, t.values, study)}  params {t.params}")


def print_running(study, trials):
    """Each RUNNING trial: where it runs, for how long, and its last logged step."""
    running = [t for t in trials if t.state == liveness.RUNNING]
    if running:
        print("running:")
    for t in running:
        a = t.user_attrs
        where = f"  task {a['slurm_task']}" if a.get(attr.SLURM_TASK) else ""
        age = duration(trial_seconds(t))
        step = study_control.last_step(a[attr.LOG_PATH]) if a.get(attr.LOG_PATH) else None
        last = f"  step {step[0]} ({step[1]}) {duration(time.time() - step[2].timestamp())} ago" if step else ""
        if not step and t.intermediate_values:  # a plain objective's trial.report: no log line, the storage has it
            reported = max(t.intermediate_values)
            last = f"  step {reported} ({t.intermediate_values[reported]:.6g})"
        print(f"  trial {t.number}  host {a.get('host', '?')}  pid {a.get('pid', '?')}  age {age}{where}{last}")


def print_top_up(missing, failed, streak, next_part=None):
    """What to do when the budget is not covered by queued or running tasks."""
    if missing <= 0:
        return
    if next_part and not streak:  # a submit limit held tasks back, and a chained job submits them
        print(next_part)
        return
    crashed = [t for t in failed if failures.in_the_trainer(t)]
    if crashed:
        print(f"{len(crashed)} trial(s) failed in the trainer (reasons above, tracebacks in their worker.log)")
    todo = "fix the trainer, then submit again" if streak else "submit again to top up"
    print(f"{missing} trial(s) not covered by any worker: {todo}")


def disk_line(study, config):
    """The run directory's size (du, at most 10 s). Deleting what nobody reads is the submit's and export's job."""
    used = checkpoints.disk_usage(run_dir(config))
    return f"disk: {run_dir(config)} " + (checkpoints.size(used) if used is not None else "? (du took over 10 s)")


def eta_line(trials, budget, concurrency, mark, workers):
    """When the budget will be met, at the study's concurrency; `workers`: trials running and tasks queued."""
    if mark:
        return f"{mark}: no new trial starts (--resume{'' if mark == 'paused' else ' or submit again'})"
    if sum(t.state in FINISHED for t in trials) >= budget:
        return "ETA: budget met"
    if workers == 0:
        return "ETA: none, no worker is running or queued"
    seconds = study_control.eta_seconds(trials, budget, concurrency)
    if seconds is None:
        return f"ETA: once a trial has finished ({concurrency} at once)"
    if seconds < 1:  # what is left is running, past the mean time of a finished trial
        return f"ETA: when the running trials end (past the mean time of a finished trial; {concurrency} at once)"
    return f"ETA: ~{duration(seconds)} ({concurrency} at once)"


def print_slurm_tasks(study, config, trials, tasks):
    """One line per array task and trial: SLURM's view (one squeue, at most one sacct) joined with the study."""
    job_ids = sorted(study_jobs(study))
    queued = {
        k: "HELD" if state == "PENDING" and "held" in reason.lower() else state
        for k, (state, _, reason) in (tasks or {}).items()
    }
    ended, died = task_ends.status_lines(job_ids, trials, config)
    states = {**ended, **queued}
    by_task = {}
    for t in trials:
        if t.user_attrs.get(attr.SLURM_TASK, "").split("_")[0] in job_ids:
            by_task.setdefault(t.user_attrs[attr.SLURM_TASK], []).append(t)
    rows = [(key, t) for key in sorted(set(states) | set(by_task), key=task_order) for t in by_task.get(key) or [None]]
    # A large array: the tasks that ended with their trial finished are the many and the dull; the last few show.
    dull = [i for i, (key, t) in enumerate(rows) if t and t.state in FINISHED and states.get(key, "ended") != "RUNNING"]
    hidden = set(dull[:-MAX_TASK_LINES]) if len(rows) > 2 * MAX_TASK_LINES else set()
    shown = [(key, t) for i, (key, t) in enumerate(rows) if i not in hidden]
    values = [", ".join(f"{v:.6g}" for v in t.values) if t and t.values else "-" for _, t in shown]  # several too
    width = max([12, *map(len, values)])
    print(f"{'array task':<14}{'slurm':<15}{'trial':>6}  {'state':<9}{'value':>{width}}  {'elapsed':>9}  log")
    if hidden:
        print(f"  ({len(hidden)} earlier array tasks ended with their trial finished: not listed)")
    for (key, t), value in zip(shown, values, strict=True):
        elapsed = duration(trial_seconds(t)) if t else "-"
        print(
            f"{key:<14}{states.get(key, 'ended'):<15}{t.number if t else '-':>6}  {t.state.name if t else '-':<9}"
            f"{value:>{width}}  {elapsed:>9}  {t.user_attrs.get('slurm_out', '-') if t else '-'}"
        )
    if died:
        more = f" (the last {MAX_TASK_LINES} of {len(died)})" if len(died) > MAX_TASK_LINES else ""
        print(f"tasks that ended badly{more}:")
    for line in died[-MAX_TASK_LINES:]:
        print(f"  {line}")


def trial_seconds(trial):
    """Training time of a finished trial; time since the start of a running one."""
    if trial.state == liveness.RUNNING and trial.datetime_start:
        return (datetime.now() - trial.datetime_start).total_seconds()
    if attr.TRAIN_SECONDS not in trial.user_attrs and trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()  # failed before it counted
    return trial.user_attrs.get(attr.TRAIN_SECONDS, 0)


def task_order(key):
    job, _, task = key.partition("_")
    return (int(job) if job.isdigit() else 0, int(task) if task.isdigit() else 0)


def progress_bar(done, total, width=30):
    filled = min(width, round(width * done / total)) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


MAX_TASK_LINES = 20  # status lists every array task with something to say, and this many of the rest
