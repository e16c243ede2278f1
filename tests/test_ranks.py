"""Several processes per trial (slurm.tasks_per_trial): the array file, torch's rendezvous, and real 2-rank
trials on the local cluster (gloo on CPUs): one Optuna trial per task, every rank stopping together."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, finished, load_study, run_script, write_experiment
from slurm_helpers import submitted_jobs, wait_for_jobs, wait_until

from parallel_optuna import ranks
from parallel_optuna.config import load_config
from parallel_optuna.rendezvous import CHANNEL, expand_hostlist, rendezvous_env
from parallel_optuna.run_dir import run_dir, trusted_run_dir


def ddp_experiment(tmp_path, changes=None):
    """The DDP trainer of examples/ddp, 2 processes per trial, small and quick."""
    path = write_experiment(
        tmp_path / "exp",
        {
            "study.trainer": "trainer:train",
            "study.optimization_metric": "val_loss",
            "study.n_trials": 2,
            "slurm.tasks_per_trial": 2,
            "model.width": 16,
            "training.n_samples": 256,
            "training.epochs": 2,
            **(changes or {}),
        },
    )
    config = yaml.safe_load(path.read_text())
    del config["data"]  # it makes its data in code
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(PROJECT / "examples" / "ddp" / "trainer.py", path.parent / "trainer.py")
    return path


def submit(path):
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 0, out.stdout + out.stderr
    return submitted_jobs(out.stdout)


def task_logs(path):
    return "\n".join(f.read_text() for f in sorted((path.parent / "runs/tiny/slurm_logs").glob("*.out")))


# ---------------------------------------------------------------- no cluster needed
def test_the_array_file_launches_the_ranks_with_srun(tmp_path):
    path = ddp_experiment(tmp_path, {"slurm.nodes_per_trial": 2, "slurm.gpus_per_task": 1, "slurm.gpu_type": "a100"})
    out = run_script("submit_study.py", "--config", path, "--no-submit_jobs")
    assert out.returncode == 0, out.stderr
    script = (path.parent / "runs/tiny/array_job.sbatch").read_text()
    for line in ("#SBATCH --ntasks=2", "#SBATCH --nodes=2", "#SBATCH --gpus-per-task=a100:1"):
        assert line + "\n" in script
    launch = next(line for line in script.splitlines() if "worker.py" in line)
    assert launch.startswith("srun --kill-on-bad-exit=1 --cpus-per-task=1 --gpu-bind=none "), launch
    assert "kill -USR2 $worker" in script, "the walltime signal goes to srun, which passes it to every rank"
    assert "kill -TERM" not in script and "kill -USR1 $worker" in script, "srun would end the ranks at once on TERM"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)

    one = write_experiment(tmp_path / "one", {"slurm.gpus_per_task": 1})
    assert run_script("submit_study.py", "--config", one, "--no-submit_jobs").returncode == 0
    script = (one.parent / "runs/tiny/array_job.sbatch").read_text()
    assert "#SBATCH --ntasks=1\n" in script and "#SBATCH --gpus=1\n" in script and "srun --" not in script
    assert "kill -TERM $worker" in script


def test_more_nodes_than_processes_is_refused(tmp_path):
    path = ddp_experiment(tmp_path, {"slurm.nodes_per_trial": 3})
    out = run_script("submit_study.py", "--config", path, "--no-submit_jobs")
    assert out.returncode == 2
    assert "slurm.nodes_per_trial: 3 nodes for 2 processes" in out.stderr


def test_rendezvous_of_two_nodes_from_slurm_variables():
    assert expand_hostlist("node[01-02]") == ["node01", "node02"]
    assert expand_hostlist("gpu[7,9-10]-ib,login1") == ["gpu7-ib", "gpu9-ib", "gpu10-ib", "login1"]
    rank_3 = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_JOB_ID": "123457",
    }
    env = rendezvous_env(rank_3)
    torch_env = {"MASTER_ADDR": "node01", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert env == {**torch_env, CHANNEL: "123457.0"}, "MASTER_PORT: rank 0's; the ranks' folder: the job's"
    assert rendezvous_env({**rank_3, "SLURM_NTASKS": "1"}) == {}, "one process: torch's variables stay as they are"


def test_another_rank_refuses_a_run_directory_it_cannot_trust(tmp_path):
    """Ranks other than 0 unpickle rank 0's checkpoint: they check runs/<study> first, as rank 0 does."""
    path = ddp_experiment(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path.parent / "runs").mkdir()
    (path.parent / "runs/tiny").symlink_to(elsewhere)
    rank_1 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7"}
    out = run_script("worker.py", "--config", path, env=rank_1, timeout=60)
    assert out.returncode == 2 and "runs/tiny is a symlink" in out.stderr, out.stdout + out.stderr
    assert not any(elsewhere.iterdir()), "nothing made in the folder the symlink points at"


def test_another_rank_runs_the_trainer_of_the_trial_not_of_the_yaml_today(tmp_path):
    """A resumed trial keeps its config version: the other ranks load the trainer its config.yaml names."""
    path = ddp_experiment(tmp_path)
    (path.parent / "pinned.py").write_text("def train(config, trial):\n    return {'val_loss': 1.0}\n")
    folder = path.parent / "runs/tiny/trials/3"
    folder.mkdir(parents=True)
    resolved = dict(load_config(path))  # as rank 0 writes it: with the defaults
    resolved["study"]["trainer"] = "pinned:train"
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    config, kind, function = ranks.trial_code(load_config(path), 3)
    assert kind == "trainer" and function.__module__ == "pinned" and config["study"]["trainer"] == "pinned:train"


def test_a_submit_deletes_the_ranks_folders_of_local_launchers_gone_from_this_host(tmp_path):
    """A launcher killed by SIGKILL leaves its workers' folders; one of another host may still run."""
    config = load_config(ddp_experiment(tmp_path))
    trusted_run_dir(config)  # made, as a submit makes it
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid runs no more
    host = os.uname().nodename
    names = [f"local-{host}-{gone.pid}-0", f"local-{host}-{os.getpid()}-0", f"local-elsewhere-{gone.pid}-0"]
    for name in names:
        (ranks.channel(config, name) / "trial.json").write_text("{}")
    assert ranks.remove_leftovers(config) == 1
    assert sorted(p.name for p in (run_dir(config) / "ranks").iterdir()) == sorted(names[1:])


# ---------------------------------------------------------------- on the local cluster
@pytest.mark.slurm
def test_a_ddp_trainer_meets_the_budget_with_one_optuna_trial_per_task(slurm, tmp_path):
    path = ddp_experiment(tmp_path)
    wait_for_jobs(submit(path))
    study = load_study(path)
    assert len(study.trials) == 2, [(t.number, t.state.name) for t in study.trials]
    assert len(finished(study)) == 2
    assert all(t.user_attrs["metrics"]["world_size"] == 2 for t in study.trials), "both ranks trained each trial"
    logs = task_logs(path)
    for t in study.trials:
        assert f"rank1: trial {t.number}: training with rank 0" in logs
    assert not any((path.parent / "runs/tiny/ranks").iterdir()), "each task deletes its files between the ranks"


def objective_experiment(tmp_path, n_trials, epochs, epoch_seconds=0):
    """examples/ddp/objective.py, 2 processes per trial, small and quick."""
    path = write_experiment(tmp_path / "exp", {"slurm.tasks_per_trial": 2, "study.n_trials": n_trials})
    config = yaml.safe_load(path.read_text())
    config["study"].update(objective="objective:objective", trainer=None, optimization_metric="val_loss")
    del config["search_space"], config["data"]
    path.write_text(yaml.safe_dump(config))
    code = (PROJECT / "examples/ddp/objective.py").read_text()
    code = code.replace("EPOCHS, N_SAMPLES = 10, 2048", f"EPOCHS, N_SAMPLES = {epochs}, 256")
    slow = f"__import__('time').sleep({epoch_seconds})\n        trial.report(val_loss, epoch)"
    (path.parent / "objective.py").write_text(code.replace("trial.report(val_loss, epoch)", slow))
    return path


@pytest.mark.slurm
def test_a_plain_objective_with_torch_distributed_trial(slurm, tmp_path):
    path = objective_experiment(tmp_path, n_trials=2, epochs=2)
    wait_for_jobs(submit(path))
    study = load_study(path)
    assert len(study.trials) == 2 and len(finished(study)) == 2, [(t.number, t.state.name) for t in study.trials]
    assert all(set(t.params) == {"width", "lr"} for t in study.trials)
    logs = task_logs(path)
    assert all(f"rank1: trial {t.number}: training with rank 0" in logs for t in study.trials)


@pytest.mark.slurm
def test_pruning_stops_every_rank_together(slurm, tmp_path):
    path = ddp_experiment(tmp_path, {"study.n_trials": 1, "study.pruner": {"name": "ThresholdPruner", "upper": 0.0}})
    wait_for_jobs(submit(path))
    study = load_study(path)
    assert [t.state.name for t in study.trials] == ["PRUNED"]
    logs = task_logs(path)
    assert "trial 0 PRUNED (pruned at step 0)" in logs
    assert "rank1: trial 0 pruned at step 0 (rank 0's decision)" in logs
    errors = "".join(f.read_text() for f in (path.parent / "runs/tiny/slurm_logs").glob("*.err"))
    assert "Traceback" not in errors, errors


def rank_pid(path, rank):
    """The pid of the worker of this experiment that runs as the given rank of its task."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(path).encode() in cmdline and b"worker.py" in b" ".join(cmdline):
            if f"SLURM_PROCID={rank}".encode() in environ:
                return int(proc.name)
    return None


def running_with_checkpoint(path):
    study = load_study(path)

    def find():
        for t in study.get_trials():
            if (
                t.state.name == "RUNNING"
                and (path.parent / "runs/tiny/trials" / str(t.number) / "checkpoint.pt").exists()
            ):
                return t

    return wait_until(find, what="a running trial with a checkpoint")


@pytest.mark.slurm
def test_kill_9_of_rank_1_fails_the_trial_once_and_its_retry_resumes(slurm, tmp_path):
    changes = {"training.epochs": 5, "training.epoch_seconds": 1.0, "slurm.max_concurrent_jobs": 1}
    path = ddp_experiment(tmp_path, changes)
    jobs = submit(path)
    victim = running_with_checkpoint(path)
    os.kill(wait_until(lambda: rank_pid(path, 1), what="rank 1"), signal.SIGKILL)
    wait_for_jobs(jobs)
    study = load_study(path)
    assert len(finished(study)) == 2
    dead = study.trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["fail_reason"].startswith("worker died"), dead.user_attrs
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1, "one retry, not one per rank"
    assert retries[0].state.name == "COMPLETE"
    assert sorted(retries[0].intermediate_values) == list(range(5)), "the retry continued the dead trial's curve"
    assert f"rank1: trial {retries[0].number} resumes from" in task_logs(path)


@pytest.mark.slurm
def test_a_walltime_requeue_resumes_every_rank(slurm, tmp_path):
    path = ddp_experiment(tmp_path, {"study.n_trials": 1, "training.epochs": 6, "training.epoch_seconds": 1.0})
    jobs = submit(path)
    running_with_checkpoint(path)
    task = f"{jobs[0]}_0"
    subprocess.run(["scancel", "--batch", "--signal=USR2", task], check=True)  # as SLURM's B:USR2 before the walltime
    wait_for_jobs(jobs)
    trial = load_study(path).trials[0]
    assert trial.state.name == "COMPLETE", trial.user_attrs
    assert trial.user_attrs["requeues"] == 1 and trial.user_attrs["slurm_restart_count"] == 1
    assert sorted(trial.intermediate_values) == list(range(6))
    logs = task_logs(path)
    assert "rank1: trial 0 stops at its checkpoint after SIGUSR2 (rank 0's decision)" in logs
    assert "rank1: trial 0 resumes from" in logs


@pytest.mark.slurm
def test_a_cancel_stops_every_rank_at_a_checkpoint_and_a_submit_continues_it(slurm, tmp_path):
    """--cancel TERMs the batch shell, which passes it through srun as USR1: srun itself would kill the ranks."""
    path = ddp_experiment(tmp_path, {"study.n_trials": 1, "training.epochs": 6, "training.epoch_seconds": 1.0})
    jobs = submit(path)
    running_with_checkpoint(path)
    out = run_script("submit_study.py", "--config", path, "--cancel")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for_jobs(jobs)
    trial = load_study(path).trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "cancelled", trial.user_attrs
    logs = task_logs(path)
    assert "rank1: trial 0 stops at its checkpoint after SIGTERM (rank 0's decision)" in logs
    assert "forcing job termination" not in "".join(
        f.read_text() for f in (path.parent / "runs/tiny/slurm_logs").glob("*.err")
    )
    wait_for_jobs(submit(path))
    retry = load_study(path).trials[1]
    assert retry.state.name == "COMPLETE" and retry.user_attrs["retry_of"] == 0
    assert sorted(retry.intermediate_values) == list(range(6)), "the retry continued the cancelled trial's curve"
    assert "rank1: trial 1 resumes from" in task_logs(path)


@pytest.mark.slurm
def test_the_plain_objective_example_resumes_after_a_walltime_requeue(slurm, tmp_path):
    path = objective_experiment(tmp_path, n_trials=1, epochs=6, epoch_seconds=1.0)
    jobs = submit(path)
    study = load_study(path)
    wait_until(lambda: any(t.intermediate_values for t in study.get_trials()), what="a reported epoch")
    subprocess.run(["scancel", "--batch", "--signal=USR2", f"{jobs[0]}_0"], check=True)  # as SLURM's B:USR2
    wait_for_jobs(jobs)
    trial = load_study(path).trials[0]
    assert trial.state.name == "COMPLETE" and trial.user_attrs["requeues"] == 1, trial.user_attrs
    assert sorted(trial.intermediate_values) == list(range(6))
    assert "resuming from " in task_logs(path), "rank 0's checkpoint, on every rank"


BROKEN = """import torch.distributed as dist


def train(config, trial):
    dist.init_process_group("gloo")
    dist.barrier()
    raise KeyError("no column 'target' in the data")
"""


@pytest.mark.slurm
def test_a_trainer_that_raises_on_every_rank_fails_its_trial_once_without_retry(slurm, tmp_path):
    path = ddp_experiment(tmp_path, {"study.n_trials": 1, "study.trainer": "broken:train"})
    (path.parent / "broken.py").write_text(BROKEN)
    wait_for_jobs(submit(path))
    study = load_study(path)
    assert [t.state.name for t in study.trials] == ["FAIL"], "the trainer's failure: no retry"
    assert study.trials[0].user_attrs["fail_reason"] == "KeyError: \"no column 'target' in the data\""
    assert "rank1: trial 0 failed on rank 1" in task_logs(path)


ONE_RANK_RAISES = """import torch
import torch.distributed as dist


def train(config, trial):
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == RANK:
        raise KeyError("no column 'target' in this shard")
    dist.all_reduce(torch.ones(1))  # the other rank waits here for the one that raised
    return {"val_loss": 0.0}
"""


@pytest.mark.slurm
def test_a_trainer_that_raises_on_one_rank_fails_its_trial_and_ends_the_task(slurm, tmp_path):
    """Rank 0 or rank 1 alone raises while the other waits in an allreduce: the trial fails as the trainer's,
    once, and the task ends at once (not at its walltime) and runs no more trials; a submit tops up."""
    changes = {"study.n_trials": 2, "slurm.trials_per_task": 2, "slurm.max_concurrent_jobs": 1}
    paths = [ddp_experiment(tmp_path / f"rank{r}", {**changes, "study.trainer": "broken:train"}) for r in (0, 1)]
    for r, path in enumerate(paths):
        (path.parent / "broken.py").write_text(ONE_RANK_RAISES.replace("RANK", str(r)))
    wait_for_jobs([job for path in paths for job in submit(path)], timeout=90)  # else held until the walltime
    for r, path in enumerate(paths):
        study = load_study(path)
        assert [t.state.name for t in study.trials] == ["FAIL"], "the trainer's failure: no retry, no next trial"
        reason = study.trials[0].user_attrs["fail_reason"]
        assert reason == ("rank 1: " if r else "") + "KeyError: \"no column 'target' in this shard\""
        assert (
            "2 trial(s) not covered by any worker" in run_script("submit_study.py", "--config", path, "--status").stdout
        )

    path, ranks = paths[0], paths[0].parent / "runs/tiny/ranks"
    assert any(ranks.iterdir()), "the ended task left its files between the ranks"
    (path.parent / "broken.py").write_text("from trainer import train  # noqa: F401\n")  # fixed
    wait_for_jobs(submit(path))
    study = load_study(path)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"], "topped up to the budget"
    assert not any(ranks.iterdir()), "the submit deletes the ended task's files; a normal end, its own"


# ---------------------------------------------------------------- --local: the ranks started on this machine
def local_run(path, workers=1):
    """submit_study.py --local K, as make demo runs it; its output."""
    out = run_script("submit_study.py", "--config", path, "--local", workers, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_a_local_run_trains_each_trial_on_every_rank(tmp_path):
    path = ddp_experiment(tmp_path)
    logs = local_run(path, workers=2)
    study = load_study(path)
    assert len(study.trials) == 2 and len(finished(study)) == 2, [(t.number, t.state.name) for t in study.trials]
    assert all(t.user_attrs["metrics"]["world_size"] == 2 for t in study.trials), "both ranks trained each trial"
    assert all(f"rank1: trial {t.number}: training with rank 0" in logs for t in study.trials), logs[-3000:]
    assert not any((path.parent / "runs/tiny/ranks").iterdir()), "the files between the ranks are gone"


def test_a_local_run_of_a_plain_objective_with_torch_distributed_trial(tmp_path):
    pytest.importorskip("optuna_integration", reason="pip install optuna-integration==5.0.0")
    path = objective_experiment(tmp_path, n_trials=2, epochs=2)
    logs = local_run(path)
    study = load_study(path)
    assert len(study.trials) == 2 and len(finished(study)) == 2, [(t.number, t.state.name) for t in study.trials]
    assert all(set(t.params) == {"width", "lr"} for t in study.trials)
    assert all(f"rank1: trial {t.number}: training with rank 0" in logs for t in study.trials), logs[-3000:]


def test_ctrl_c_of_a_local_run_stops_every_rank_at_a_checkpoint(tmp_path):
    path = ddp_experiment(tmp_path, {"study.n_trials": 1, "training.epochs": 30, "training.epoch_seconds": 0.5})
    command = [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--local", "1"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    checkpoint = path.parent / "runs/tiny/trials/0/checkpoint.pt"
    wait_until(checkpoint.exists, what="a checkpoint")
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, _ = run.communicate(timeout=60)  # its output ends once every rank ended
    assert run.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert "rank1: trial 0 stops at its checkpoint after SIGINT (rank 0's decision)" in out, out[-3000:]
    [trial] = load_study(path).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted by SIGINT"


def test_a_local_rank_0_that_dies_ends_the_other_ranks(tmp_path):
    """Rank 1 would wait for rank 0 in init_process_group() for ever: the launcher ends it, as srun would."""
    path = ddp_experiment(tmp_path, {"study.n_trials": 1})
    trainer = path.parent / "trainer.py"
    die = "def train(config, trial):\n    if os.environ['RANK'] == '0':\n        os.kill(os.getpid(), 9)\n"
    trainer.write_text(trainer.read_text().replace("def train(config, trial):\n", die))
    command = [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--local", "1"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = run.communicate(timeout=120)
        assert not processes_of_group(run.pid), "every rank ended with the run"
    finally:
        end_group(run.pid)
    trial = load_study(path).trials[0]  # and its retry, queued by the run's status at its end
    assert f"warning: rank 0 of local worker {trial.user_attrs['pid']} was killed (SIGKILL)" in err, err
    assert run.returncode == 1 and "1 trial(s) of the budget did not finish" in err


def test_a_local_rank_ends_itself_once_its_launcher_and_rank_0_were_killed(tmp_path):
    """A launcher killed by SIGKILL cannot end its ranks: rank 1, left waiting for a dead rank 0, ends by itself."""
    path = ddp_experiment(tmp_path, {"study.n_trials": 1, "training.epochs": 30, "training.epoch_seconds": 0.5})
    command = [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--local", "1"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until((path.parent / "runs/tiny/trials/0/checkpoint.pt").exists, what="a checkpoint")
        rank_0 = load_study(path).trials[0].user_attrs["pid"]
        [rank_1] = processes_of_group(run.pid) - {run.pid, rank_0}
        run.kill()
        run.wait()
        os.kill(rank_0, signal.SIGKILL)
        wait_until(lambda: rank_1 not in processes_of_group(run.pid), timeout=30, what="rank 1 to end")
    finally:
        end_group(run.pid)


def processes_of_group(group: int) -> set[int]:
    """The pids of a process group's processes that still run (a zombie ended)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, process_group = stat.read_text().rpartition(")")[2].split()[:3]
            if state != "Z" and int(process_group) == group:
                pids.add(int(stat.parent.name))
    return pids


def end_group(group: int) -> None:
    """Kill what is left of a test's process group (a test that failed leaves no rank running)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def test_a_local_run_refuses_several_nodes_per_trial(tmp_path):
    path = ddp_experiment(tmp_path, {"slurm.nodes_per_trial": 2})
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith(f"error: {path}: slurm.nodes_per_trial: 2 nodes per trial: --local runs on this")
    assert not (path.parent / "runs").exists(), "nothing started"
