"""The trials' files that cost disk: what `make best` exports, what is kept, what is deleted.

Per trial, runs/<study>/trials/<number>/ may hold
    checkpoint.pt   the latest state the trainer stored with save_checkpoint(): a requeue resumes from it,
                    a retry of a dead trial continues from it
    weights.pt      the trained model the trainer stored with save_weights()

$SCRATCH has a quota, so `clean` deletes what nobody will read again. It keeps
  - every file of a RUNNING or WAITING trial;
  - the checkpoint of a FAIL trial while a retry of it waits or runs without its own copy yet
    (worker.adopt_origin_checkpoint copies it; the copy is renamed into place, so once the
    retry's checkpoint exists it is whole); a FAIL trial without a retry keeps it until the study
    is finished (liveness enqueues a retry right after failing a trial: never lose it in between);
  - the weights of the study.keep_best best COMPLETE trials, or their last checkpoint if the
    trainer saved no weights (the Pareto front, for a multi-objective study).
Everything else goes: PRUNED trials, COMPLETE trials outside the best, FAIL trials nobody continues
(cancelled, crashed, surplus) once the study is finished, and the half-written files of killed workers.
The submit and the export clean every trial. Workers clean after every trial they run, but only the
trials whose files can have become removable since the last clean (`recent`): a study of 10,000
trials would otherwise cost every worker 40,000 file checks per trial. Metrics, configs and logs
are never deleted.
"""

import contextlib
import os
import shutil
import subprocess

import optuna

from parallel_optuna import retries
from parallel_optuna.run_dir import run_dir
from parallel_optuna.study import still_to_run, study_budget

CHECKPOINT, WEIGHTS = "checkpoint.pt", "weights.pt"
RECENT = 200  # a worker's clean looks at the newest trials, far more than run at once
State = optuna.trial.TrialState


def trial_folder(config, number):
    return run_dir(config) / "trials" / str(number)


def best_numbers(study, trials, keep):
    """The trials whose weights are kept: the `keep` best COMPLETE ones."""
    if len(study.directions) > 1:
        return {t.number for t in study.best_trials}
    complete = [t for t in trials if t.state == State.COMPLETE]
    complete.sort(key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    return {t.number for t in complete[:keep]}


def retry_sources(trials, config):
    """(FAIL trials that have a retry, those whose checkpoint a retry may still copy).

    A whole chain counts: a retry that died before its copy landed leaves its own retry to copy from an
    older trial of the chain (worker.adopt_origin_checkpoint looks back along it).
    """
    retried, pending = set(), set()
    for t in trials:
        chain = retries.chain(t)
        retried.update(chain)
        copied = (trial_folder(config, t.number) / CHECKPOINT).exists()
        if t.state == State.WAITING or (t.state == State.RUNNING and not copied):
            pending.update(chain)
    return retried, pending


def study_finished(trials, budget):
    """The budget is met and nothing runs or waits: no trial will be retried any more."""
    return still_to_run(trials, budget) == 0 and not any(t.state in (State.RUNNING, State.WAITING) for t in trials)


def fail_kept(number, retried, pending, done):
    """A FAIL trial's checkpoint stays while a retry will copy it, or one may yet be enqueued."""
    return number in pending or (number not in retried and not done)


def recent(study, trials, keep):
    """The trials a worker's clean looks at: the RECENT newest and the RECENT last to finish, every
    FAIL trial (a retry may have ended its wait), and those that were the best before the newest
    came (one may have been pushed out). A multi-objective study's front can lose any member: there
    it is every trial."""
    if len(study.directions) > 1 or len(trials) <= RECENT:
        return trials
    newest = max(t.number for t in trials)
    finished = sorted((t for t in trials if t.datetime_complete), key=lambda t: t.datetime_complete)
    looked_at = {t.number for t in finished[-RECENT:]}
    looked_at |= best_numbers(study, [t for t in trials if t.number <= newest - RECENT], keep)
    return [t for t in trials if t.number > newest - RECENT or t.state == State.FAIL or t.number in looked_at]


def removable(study, config, trials, candidates=None):
    """{trial number: file names} of finished trials (of `candidates`, else all) that no retry,
    resume or export will read."""
    best, (retried, pending) = best_numbers(study, trials, config["study"]["keep_best"]), retry_sources(trials, config)
    done = study_finished(trials, study_budget(study, config))
    names = {}
    for t in trials if candidates is None else candidates:
        if t.state in (State.RUNNING, State.WAITING):
            continue
        names[t.number] = {"checkpoint.partial", "weights.partial"}  # a write its worker never finished
        if t.number in best:
            if (trial_folder(config, t.number) / WEIGHTS).exists():
                names[t.number].add(CHECKPOINT)  # the weights are what make best exports
        elif t.state != State.FAIL or not fail_kept(t.number, retried, pending, done):
            names[t.number] |= {CHECKPOINT, WEIGHTS}
    return names


def clean(study, config, everything=True):
    """Delete the checkpoints and weights nobody will read again; returns (files, bytes) freed.

    everything=False: only the trials that can have changed since the last clean (recent).
    One listing per trial folder, in plain strings: a study of 10,000 trials has 10,000 folders.
    """
    files = freed = 0
    trials = study.get_trials(deepcopy=False)
    candidates = None if everything else recent(study, trials, config["study"]["keep_best"])
    folders = str(run_dir(config) / "trials")
    for number, names in removable(study, config, trials, candidates).items():
        folder = os.path.join(folders, str(number))
        with contextlib.suppress(OSError):  # no folder, a file already gone, or not ours to delete: never an error
            for name in names.intersection(os.listdir(folder)):
                path = os.path.join(folder, name)
                size = os.stat(path).st_size
                os.unlink(path)
                files, freed = files + 1, freed + size
    return files, freed


def clean_and_say(study, config):
    """clean(), for a command that says what it wrote: the submit and the export."""
    files, freed = clean(study, config)
    if files:
        print(f"deleted {files} checkpoint/weights file(s) that no trial will read again ({size(freed)} freed)")


def best_weights(config, number):
    """The file that holds the trial's trained model: its weights, else its last checkpoint."""
    folder = trial_folder(config, number)
    return next((folder / name for name in (WEIGHTS, CHECKPOINT) if (folder / name).exists()), None)


def export_weights(config, number, target):
    """Copy the trial's weights (or last checkpoint) to target, atomically; returns the source or None."""
    source = best_weights(config, number)
    if source is None:
        return None
    partial = target.with_suffix(".partial")
    shutil.copy(source, partial)
    partial.replace(target)
    return source


def disk_usage(folder, timeout=10):
    """Bytes under folder, from `du`; None when du takes longer than timeout (a slow shared filesystem)."""
    if not folder.is_dir():
        return 0
    try:
        out = subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()  # du exits 1 when a file vanished mid-walk, and still prints the total
    return int(words[0]) * 1024 if words and words[0].isdigit() else None


def size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
