"""The rendered array file and the sbatch calls (a fake sbatch records them; no cluster needed)."""

import os
import signal
import stat
import subprocess
import time

import pytest
from conftest import finished, load_study, plugin_experiment, run_script, write_experiment

from parallel_optuna.study import mask_password

FAKE_SLURM = {
    "sbatch": 'case " $* " in *" --test-only "*) exit 0;; esac\n'  # the request check: any request fits
    'echo "$@" >> "$FAKE_LOG"; echo $((4000 + $(wc -l < "$FAKE_LOG")))',
    "scontrol": 'if [ "$1 $2" = "show config" ]; then echo "MaxArraySize            = 3"; fi',
    "squeue": 'echo -n "${FAKE_SQUEUE:-}"',  # what the queue holds, as squeue prints it
}


@pytest.fixture
def fake_slurm(tmp_path):
    """sbatch, scontrol and squeue stand-ins that record what they were asked."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "sbatch_calls.txt"
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log)}, log


def rendered(path):
    return (path.parent / "runs" / "tiny" / "array_job.sbatch").read_text()


def test_dry_run_writes_and_prints_the_file_and_the_command(experiment, fake_slurm):
    env, calls = fake_slurm
    out = run_script("submit_study.py", "--config", experiment, "--no-submit_jobs", env=env)
    assert out.returncode == 0, out.stderr
    script = rendered(experiment)
    assert script in out.stdout
    assert f"sbatch --parsable --array=0-3%2 {experiment.parent}/runs/tiny/array_job.sbatch" in out.stdout
    assert not calls.exists(), "a dry run submits nothing"
    for line in (
        "#SBATCH --array=0-3%2",
        "#SBATCH --ntasks=1",
        "#SBATCH --time=00:10:00",
        "#SBATCH --mem-per-cpu=500M",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR2@60",
        f"#SBATCH --output={experiment.parent}/runs/tiny/slurm_logs/optuna_%A_%a.out",
    ):
        assert line + "\n" in script
    assert "--gpus" not in script, "gpus_per_task: 0 renders a CPU-only task"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    typed = run_script("submit_study.py", "--config", experiment, "--no-submit_jobs", "--gpu_type", "a100", env=env)
    assert "note: slurm.gpu_type a100 is not asked for: slurm.gpus_per_task is 0" in typed.stdout
    assert "a100" not in rendered(experiment)


def test_every_option_reaches_its_directive(tmp_path):
    path = write_experiment(
        tmp_path / "exp",
        {
            "slurm.gpus_per_task": 1,
            "slurm.gpu_type": "rtx_4090",
            "slurm.partition": "gpu,gpu-long",
            "slurm.account": "proj-1",
            "slurm.qos": "high",
            "slurm.constraint": "a100|h100",
            "slurm.cpus_per_task": 4,
            "slurm.extra_directives": ["--mail-type=END", "--exclusive"],
            "slurm.setup": ["module load cuda/12.1", "source ~/envs/optuna/bin/activate"],
        },
    )
    out = run_script(
        "submit_study.py",
        "--config",
        path,
        "--no-submit_jobs",
        "--max_concurrent_jobs",
        3,
        "--walltime",
        "2-00:00:00",
        "--mem_per_cpu",
        "23G",
        "--n_trials",
        10,
    )
    assert out.returncode == 0, out.stderr
    script = rendered(path)
    for line in (
        "--array=0-9%3",
        "--time=2-00:00:00",
        "--mem-per-cpu=23G",
        "--gpus=rtx_4090:1",
        "--partition=gpu,gpu-long",
        "--account=proj-1",
        "--qos=high",
        "--constraint=a100|h100",
        "--cpus-per-task=4",
        "--mail-type=END",
        "--exclusive",
    ):
        assert f"#SBATCH {line}\n" in script
    assert "module load cuda/12.1\nsource ~/envs/optuna/bin/activate\n" in script
    assert "\npython " in script, "with setup lines the task's own python runs the worker"
    # Workers find the budget on the study, not pinned on the array: a later --n_trials or YAML edit reaches them.
    assert "--n_trials" not in script and load_study(path).user_attrs["n_trials"] == 10


def test_submit_splits_arrays_larger_than_max_array_size_and_records_them(experiment, fake_slurm):
    env, calls = fake_slurm
    out = run_script("submit_study.py", "--config", experiment, "--n_trials", 7, env=env)
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    assert [line.split()[1] for line in lines] == [
        "--array=0-2%2",
        "--dependency=afterany:4001",
        "--dependency=afterany:4002",
    ]
    assert lines[2].split()[2] == "--array=0-0%2"
    jobs = load_study(experiment).user_attrs["array_jobs"]
    assert [(j["job_id"], j["tasks"]) for j in jobs] == [("4001", 3), ("4002", 3), ("4003", 1)]
    assert "squeue --me --array --jobs=4001,4002,4003" in out.stdout


def test_a_top_up_waits_for_the_studys_arrays_still_running_so_k_holds_study_wide(experiment, fake_slurm):
    env, calls = fake_slurm
    assert run_script("submit_study.py", "--config", experiment, "--n_trials", 2, env=env).returncode == 0
    env["FAKE_SQUEUE"] = "4001_1|RUNNING|0:05|None\n"  # one task of that array still runs
    out = run_script("submit_study.py", "--config", experiment, "--n_trials", 3, env=env)
    assert out.returncode == 0, out.stderr
    first, top_up = calls.read_text().splitlines()
    assert "--dependency" not in first
    assert top_up.split()[1:3] == ["--dependency=afterany:4001", "--array=0-1%2"], top_up  # 3 - 1 still queued


INJECTIONS = [
    ["--study_name", "x;touch /tmp/pwned"],
    ["--gpu_type", "a100 --wrap=id"],
    ["--walltime", "1:00$(touch /tmp/pwned)"],
    ["--partition", "gpu\n#SBATCH --wrap=touch /tmp/pwned"],
    ["--mem_per_cpu", "4G;touch /tmp/pwned"],
    ["--constraint", "a100`touch /tmp/pwned`"],
]


@pytest.mark.parametrize("flags", INJECTIONS, ids=[f[0] for f in INJECTIONS])
def test_values_that_would_break_the_array_file_are_refused_before_it_is_written(experiment, fake_slurm, flags):
    env, calls = fake_slurm
    out = run_script("submit_study.py", "--config", experiment, *flags, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert not calls.exists()
    assert not (experiment.parent / "runs").exists()


def test_shell_code_in_the_values_validation_lets_through_stays_text_when_the_array_file_runs(tmp_path):
    """runs_dir, the data's scratch folder and PYTHONPATH may hold $(...), `...` and ';': run the rendered
    file with bash, as a task would, with a stub python that only records its arguments."""
    hostile = "x$(touch${IFS}PWNED)`touch${IFS}PWNED`;touch${IFS}PWNED"
    path = write_experiment(tmp_path / "exp", {"study.runs_dir": f"runs{hostile}", "slurm.setup": ["true"]})
    env = {"SCRATCH": str(tmp_path / f"scratch{hostile}"), "PYTHONPATH": f"lib{hostile}"}
    out = run_script("submit_study.py", "--config", path, "--cluster", "--no-submit_jobs", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    stub = tmp_path / "stubbin"
    stub.mkdir()
    (stub / "python").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_ARGS"; echo "$PYTHONPATH" >> "$STUB_ARGS"\n'
    )
    (stub / "python").chmod(0o755)
    script = path.parent / f"runs{hostile}" / "tiny" / "array_job.sbatch"
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "STUB_ARGS": str(tmp_path / "args.txt")}
    task = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert task.returncode == 0, task.stdout + task.stderr
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert str(path.parent / f"runs{hostile}") in args, args  # the worker got the folder's name as it is
    assert f"{tmp_path}/scratch{hostile}/tiny/data" in args and args[-1] == f"lib{hostile}", args
    assert not list(tmp_path.rglob("PWNED")), "the payload ran"


def test_rendered_file_runs_a_trial_and_quotes_hostile_paths(tmp_path):
    """Shell metacharacters in paths stay text: run the rendered file with bash, as a task would."""
    path = write_experiment(tmp_path / "x$(touch${IFS}pwned)`id`", {"study.n_trials": 1})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    out = subprocess.run(
        ["bash", str(path.parent / "runs/tiny/array_job.sbatch")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert len(finished(load_study(path))) == 1
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_storage_from_the_environment_is_passed_by_reference(experiment, tmp_path):
    url = f"sqlite:///{tmp_path}/env.db"
    out = run_script("submit_study.py", "--config", experiment, "--no-submit_jobs", env={"OPTUNA_STORAGE": url})
    assert out.returncode == 0, out.stderr
    script = rendered(experiment)
    assert url not in script
    storage_file = experiment.parent / "runs" / "tiny" / "storage_url"
    assert f"--storage_file {storage_file}" in script
    assert storage_file.read_text().strip() == url
    assert stat.S_IMODE(storage_file.stat().st_mode) == 0o600
    assert "SQLite may hand one retried trial to two workers" in out.stderr


MASKED = [
    ("postgresql://alice:s3cret@db:5432/optuna", "postgresql://***@db:5432/optuna"),
    ("postgresql+psycopg2://alice:p@ss@w0rd@db/optuna", "postgresql+psycopg2://***@db/optuna"),  # raw '@'
    ("postgresql://alice:p%40ss%40w0rd@db/optuna", "postgresql://***@db/optuna"),  # '@' as %40
    ("postgresql://alice:pa/ss?x@db/optuna", "postgresql://***@db/optuna"),  # raw '/' and '?'
    (
        "postgresql://db/optuna?user=alice&password=s3cret&sslmode=require",
        "postgresql://db/optuna?user=alice&password=***&sslmode=require",
    ),
    ("mysql+pymysql://db/optuna?PASSWD=s3cret", "mysql+pymysql://db/optuna?PASSWD=***"),
    ("sqlite:///runs/x.db", "sqlite:///runs/x.db"),
    ("sqlite:////data/me@lab/x.db", "sqlite:////data/me@lab/x.db"),
    ("cannot open 'postgresql://alice:p@ss@db/optuna' (refused)", "cannot open 'postgresql://***@db/optuna' (refused)"),
]


@pytest.mark.parametrize("url,shown", MASKED)
def test_passwords_are_masked_when_printed(url, shown):
    assert mask_password(url) == shown


SECRET_URL = "sqlite:///{}/s.db?password=s3cret"  # SQLite ignores the key: a URL with a secret, no server needed


def test_as_job_passes_the_storage_by_reference_and_prints_no_password(experiment, tmp_path):
    url = SECRET_URL.format(tmp_path)
    out = run_script("submit_study.py", "--config", experiment, "--as_job", "--no-submit_jobs", "--storage", url)
    assert out.returncode == 0, out.stderr
    folder = experiment.parent / "runs" / "tiny"
    job = (folder / "submit_job.sbatch").read_text()
    assert "s3cret" not in job + out.stdout + out.stderr
    command = job.strip().splitlines()[-1]
    assert command.endswith(f"--storage_file {folder}/storage_url") and "--as_job" not in command, command
    assert "--storage " not in command, command
    assert (folder / "storage_url").read_text().strip() == url
    assert stat.S_IMODE((folder / "storage_url").stat().st_mode) == 0o600
    # What the job runs: the same submission, the URL read from that file.
    again = run_script("submit_study.py", *command.split()[2:])
    assert again.returncode == 0, again.stderr
    assert "s3cret" not in again.stdout + again.stderr + rendered(experiment)
    assert "password=***" in again.stdout, again.stdout


def test_trial_configs_and_exports_carry_no_credentials(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "study.storage": SECRET_URL.format(tmp_path)})
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    trial_config = (path.parent / "runs/tiny/trials/0/config.yaml").read_text()
    assert "s3cret" not in trial_config and "password=***" in trial_config
    assert "s3cret" not in (path.parent / "best_trial.yaml").read_text() + out.stdout + out.stderr


def test_cluster_mode_stages_the_data_to_scratch(experiment, tmp_path):
    scratch = tmp_path / "scratch"
    out = run_script(
        "submit_study.py", "--config", experiment, "--cluster", "--no-submit_jobs", env={"SCRATCH": str(scratch)}
    )
    assert out.returncode == 0, out.stderr
    staged = scratch / "tiny" / "data" / "ishigami.csv"
    assert staged.read_text() == (experiment.parent / "data" / "ishigami.csv").read_text()
    assert f"--data_dir {staged.parent}" in rendered(experiment)
    out = run_script("submit_study.py", "--config", experiment, "--cluster", "--no-submit_jobs", env={"SCRATCH": ""})
    assert out.returncode == 2 and "slurm.scratch" in out.stderr


def test_array_file_forwards_a_walltime_signal_that_comes_before_the_worker(tmp_path):
    """SLURM may send USR2 the moment a task starts: the task's shell keeps it for the worker."""
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "training.sleep": 0.5, "training.epochs": 20})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    task = subprocess.Popen(
        ["bash", str(path.parent / "runs/tiny/array_job.sbatch")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.2)
    task.send_signal(signal.SIGUSR2)
    _, err = task.communicate(timeout=120)
    trial = load_study(path).trials[0]
    # outside SLURM there is no task to requeue: the trial stops at its first checkpoint, reason stated
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted by SIGUSR2", err[-2000:]
    assert len(trial.intermediate_values) == 1


@pytest.mark.parametrize(
    "n_trials, per_task, k, tasks",
    [(40, 10, 4, 4), (7, 2, 2, 4), (7, 10, 4, 4), (3, 10, 4, 3), (200, 10, 4, 20), (5, 1, 2, 5)],
)
def test_packed_trials_make_fewer_tasks_but_never_fewer_than_k(experiment, fake_slurm, n_trials, per_task, k, tasks):
    env, _ = fake_slurm
    flags = ("--n_trials", n_trials, "--trials_per_task", per_task, "--max_concurrent_jobs", k)
    out = run_script("submit_study.py", "--config", experiment, "--no-submit_jobs", *flags, env=env)
    assert out.returncode == 0, out.stderr
    assert f"--array=0-{tasks - 1}%{k} " in out.stdout
    assert f"--trials {per_task}" in rendered(experiment)


def test_packing_more_trials_than_the_walltime_holds_is_said_with_the_fix(experiment, fake_slurm):
    env, _ = fake_slurm
    assert run_script("submit_study.py", "--config", experiment, "--no-submit_jobs", env=env).returncode == 0
    study = load_study(experiment)
    for seconds in (90.0, 110.0):  # a mean of 100 s; the walltime is 600 s, less 60 s of signal_grace
        trial = study.ask()
        trial.set_user_attr("train_seconds", seconds)
        study.tell(trial, 0.5)
    flags = ("--n_trials", 20, "--trials_per_task", 10, "--no-submit_jobs")
    out = run_script("submit_study.py", "--config", experiment, *flags, env=env)
    assert out.returncode == 0, out.stderr
    assert (
        "slurm.trials_per_task 10 trials of the study's mean 100 s outlast the walltime less signal_grace (540 s)"
        in out.stderr
    )
    assert "lower trials_per_task to 5 or raise slurm.walltime" in out.stderr
