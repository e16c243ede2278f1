"""Bad input: one line naming the file, the key and the fix; exit status 2; nothing created or touched."""

import importlib.util
import os
import stat
import sys

import pytest
from conftest import write_experiment

import submit_study
import worker
from parallel_optuna import array_file
from parallel_optuna.config import load_config, read_yaml

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_CMAES = importlib.util.find_spec("cmaes") is not None

# (changes to the tiny experiment, text the error line must name)
BAD = [
    ({"study.n_trial": 5}, "study.n_trial"),
    ({"slurm.gpus": 1}, "slurm.gpus"),
    ({"study.n_trials": 0}, "study.n_trials"),
    ({"study.n_trials": "ten"}, "study.n_trials"),
    ({"study.n_trials": None}, "study.n_trials"),  # 'n_trials:' with the value not yet typed
    ({"study.trainer": None}, "study.trainer"),
    ({"data": None}, "study.trainer"),  # the trainer's prepare(config) fails on it
    ({"slurm.max_concurrent_jobs": 0}, "slurm.max_concurrent_jobs"),
    ({"study.optimization_direction": "minimise"}, "study.optimization_direction"),
    ({"study.optimization_metric": "val_accuracy"}, "study.optimization_metric"),
    ({"slurm.walltime": "5 days"}, "slurm.walltime"),
    ({"slurm.walltime": "1:00$(id)"}, "slurm.walltime"),
    ({"slurm.walltime": "1-2:3:4:5"}, "slurm.walltime"),
    ({"slurm.mem_per_cpu": "23 GB"}, "slurm.mem_per_cpu"),
    ({"slurm.gpu_type": "a100 --wrap=id"}, "slurm.gpu_type"),
    ({"study.study_name": "x;touch /tmp/pwned"}, "study.study_name"),
    ({"study.study_name": "../escape"}, "study.study_name"),
    ({"slurm.extra_directives": ["--wrap=id;reboot"]}, "slurm.extra_directives"),
    ({"slurm.extra_directives": "--mail-type=END"}, "slurm.extra_directives"),
    ({"slurm.extra_directives": ["--wrap=id"]}, "slurm.extra_directives"),
    ({"slurm.extra_directives": ["--array=0-999"]}, "slurm.extra_directives"),
    ({"slurm.partition": "gpu\n#SBATCH --wrap=id"}, "slurm.partition"),
    ({"slurm.setup": "module load cuda"}, "slurm.setup"),
    ({"slurm.signal_grace": 900}, "slurm.signal_grace"),
    ({"slurm.signal_grace": 30, "slurm.walltime": "1"}, "slurm.signal_grace"),  # SLURM could signal at the start
    ({"study.sampler": {"name": "TPE"}}, "study.sampler.name"),
    ({"study.sampler": {"name": "TPESampler", "n_startup": 3}}, "study.sampler"),
    ({"study.pruner": {"name": "MedianPruner", "warmup": 1}}, "study.pruner"),
    ({"study.pruner": "median"}, "study.pruner"),
    ({"study.max_retries": -1}, "study.max_retries"),
    ({"study.trainer": "no_such_module:train"}, "study.trainer"),
    ({"study.trainer": "examples.ishigami_lstm:no_such_function"}, "study.trainer"),
    ({"study.trainer": "examples.ishigami_lstm"}, "study.trainer"),
    ({"study.runs_dir": "my runs"}, "study.runs_dir"),
    ({"search_space.model.d_pos": {"type": "integer", "low": 2, "high": 4}}, "search_space.model.d_pos.type"),
    ({"search_space.model.d_pos": {"type": "int", "low": 8, "high": 2}}, "search_space.model.d_pos"),
    ({"search_space.model.d_pos": {"type": "int", "low": 2.5, "high": 4}}, "search_space.model.d_pos.low"),
    (
        {"search_space.training.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}},
        "search_space.training.lr.low",
    ),
    (
        {"search_space.training.lr": {"type": "float", "low": 1e-3, "high": 0.1, "scale": "log"}},
        "search_space.training.lr.scale",
    ),
    ({"search_space.model.width": {"type": "int", "low": 2, "high": 4}}, "search_space.model.width"),
    ({"search_space.model.d_hidden": {"type": "categorical", "choices": []}}, "search_space.model.d_hidden.choices"),
    ({"search_space": ["model.d_pos"]}, "search_space"),
    ({"study": ["n_trials"]}, "study"),
    ({"study.storage": "postgresql://alice:s3cret@127.0.0.1:1/optuna"}, "study.storage"),
    ({"slurm.signal_grace": 70000, "slurm.walltime": "30-00:00:00"}, "slurm.signal_grace"),
    ({"search_space.model.d_pos": {"type": "int", "low": 2, "high": 8, "step": 0}}, "search_space.model.d_pos.step"),
    ({"search_space.model.d_pos": {"type": "int", "low": 2, "high": 8, "step": 0.5}}, "search_space.model.d_pos.step"),
    ({"search_space": {1: {"type": "int", "low": 1, "high": 2}}}, "search_space.1"),
    ({"study.sampler": {"name": "TPESampler", "seed": "abc"}}, "study.sampler.seed"),
    ({"study.grace_period": 60, "study.heartbeat_interval": 60}, "study.grace_period"),
]
if not HAS_SCIPY:  # Optuna itself would only fail at the first sample
    BAD.append(({"study.sampler": {"name": "QMCSampler"}}, "study.sampler.name"))
    BAD.append(({"study.pruner": {"name": "WilcoxonPruner"}}, "study.pruner.name"))
if not HAS_CMAES:
    BAD.append(({"study.sampler": {"name": "CmaEsSampler"}}, "study.sampler.name"))


def assert_one_line_error(capsys, code, path, key):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err, err
    assert err.startswith("error: ") and str(path) in err and f": {key}: " in err and "fix: " in err, err
    return err


@pytest.mark.parametrize("changes,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_is_refused_before_anything_is_created(tmp_path, capsys, changes, key):
    path = write_experiment(tmp_path / "exp", {k: v for k, v in changes.items()})
    code = submit_study.main(["--config", str(path), "--no-submit_jobs"])
    err = assert_one_line_error(capsys, code, path, key)
    assert "s3cret" not in err
    assert not (tmp_path / "exp" / "runs").exists()
    assert not (tmp_path / "exp" / "data").exists()


def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "exp" / "config.yaml"
    path.parent.mkdir()
    path.write_text("study:\n  n_trials: 4\n  sampler: {name: TPESampler\nmodel:\n  d_pos: 2\n")
    code = submit_study.main(["--config", str(path)])
    assert "line 4" in assert_one_line_error(capsys, code, path, "line 4")
    path.write_text("study:\n  n_trials: 8\n  max_retries: 1\n  n_trials: 3\n")  # PyYAML would keep the 3
    err = assert_one_line_error(capsys, submit_study.main(["--config", str(path)]), path, "line 4")
    assert "key 'n_trials' twice" in err and not (path.parent / "runs").exists()


@pytest.mark.parametrize("walltime", [30, "30", "2:30:00", "1-0", "1-12:00", "90:00"])
def test_every_slurm_time_format_is_accepted_as_written(tmp_path, walltime):
    path = tmp_path / "exp" / "config.yaml"
    write_experiment(path.parent)
    path.write_text(path.read_text().replace("walltime: 00:10:00", f"walltime: {walltime}"))
    assert submit_study.main(["--config", str(path), "--no-submit_jobs"]) == 0
    assert f"#SBATCH --time={walltime}\n" in (path.parent / "runs/tiny/array_job.sbatch").read_text()


def test_yaml_reads_numbers_as_yaml_1_2(tmp_path):
    from parallel_optuna.config import load_config, read_yaml

    assert read_yaml("a: 1e-4\nb: [1e-3, 2:30:00, 30]\nc: 010\nd: .inf") == {
        "a": 1e-4,
        "b": [1e-3, "2:30:00", 30],
        "c": "010",
        "d": float("inf"),
    }
    path = write_experiment(tmp_path / "exp")
    path.write_text(path.read_text().replace("lr: 0.01", "lr: 1e-2"))
    assert load_config(path)["training"]["lr"] == 0.01


def test_a_broken_trainer_module_is_a_config_error(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp", {"study.trainer": "broken:train"})
    (path.parent / "broken.py").write_text("def train(config, trial)\n    return {}\n")
    err = assert_one_line_error(capsys, submit_study.main(["--config", str(path)]), path, "study.trainer")
    assert "expected ':'" in err and "fix: correct the syntax at broken.py, line 1" in err


@pytest.mark.parametrize(
    "key,spec,fix",
    [
        ("study.trainer", "mine:one_arg", "def one_arg(config, trial)"),
        ("study.trainer", "mine:not_a_function", "def not_a_function(config, trial)"),
        ("study.objective", "mine:two_args", "def two_args(trial)"),
    ],
)
def test_a_trainer_that_cannot_be_called_as_one_is_refused_at_submit(tmp_path, capsys, key, spec, fix):
    path = write_experiment(tmp_path / "exp", {key: spec})
    (path.parent / "mine.py").write_text(
        "def one_arg(config):\n    return {}\n\nnot_a_function = 3\n\ndef two_args(config, trial):\n    return 0.0\n"
    )
    err = assert_one_line_error(capsys, submit_study.main(["--config", str(path), "--no-submit_jobs"]), path, key)
    assert f"fix: define {fix}" in err
    assert not (tmp_path / "exp" / "runs").exists()


@pytest.mark.parametrize("section,typo", [("search_space", "searchspace"), ("slurm", "slurms"), ("study", "studdy")])
def test_a_misspelled_section_is_refused_not_ignored(tmp_path, capsys, section, typo):
    path = write_experiment(tmp_path / "exp")
    path.write_text(path.read_text().replace(f"\n{section}:", f"\n{typo}:").replace(f"{section}:\n", f"{typo}:\n", 1))
    err = assert_one_line_error(capsys, submit_study.main(["--config", str(path), "--no-submit_jobs"]), path, typo)
    assert f"did you mean {section}?" in err
    assert not (tmp_path / "exp" / "runs").exists()


def test_a_sqlite_url_in_a_missing_folder_says_to_create_it(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp", {"study.storage": "sqlite:///no_such_dir/study.db"})
    code = submit_study.main(["--config", str(path), "--no-submit_jobs"])
    err = assert_one_line_error(capsys, code, path, "study.storage")
    assert f"fix: create the folder {tmp_path / 'exp' / 'no_such_dir'}" in err


def test_a_flag_that_needs_another_is_refused_before_anything_runs(experiment, capsys):
    assert_one_line_error(capsys, submit_study.main(["--config", str(experiment), "--trial", "1"]), "--trial", "trial")
    assert_one_line_error(capsys, submit_study.main(["--config", str(experiment), "--repair"]), "--repair", "repair")
    assert not (experiment.parent / "runs").exists()


def test_a_mistyped_or_shortened_flag_or_key_names_the_one_meant(experiment, capsys):
    for argv, near in ((["--n_trails", "5"], "--n_trials"), (["--max_concurrent", "3"], "--max_concurrent_jobs")):
        with pytest.raises(SystemExit) as end:
            submit_study.main(["--config", str(experiment), *argv, "--no-submit_jobs"])
        err = capsys.readouterr().err.strip()
        assert end.value.code == 2 and "\n" not in err and f"fix: did you mean {near}?" in err, err
    assert not (experiment.parent / "runs").exists()
    path = write_experiment(experiment.parent, {"study.n_trial": 5}, name="typo.yaml")
    assert "fix: did you mean n_trials?" in assert_one_line_error(
        capsys, worker.main(["--config", str(path)]), path, "study.n_trial"
    )


def test_status_and_export_of_a_misnamed_study_create_nothing(experiment, capsys, tmp_path):
    for flags in (["--status"], ["--export_best"]):
        assert submit_study.main(["--config", str(experiment), "--study_name", "typo", *flags]) == 2
        assert "no study 'typo'" in capsys.readouterr().err
    assert not (experiment.parent / "runs").exists()


def test_missing_file_and_bad_exp_id(tmp_path, capsys):
    assert_one_line_error(
        capsys, submit_study.main(["--config", str(tmp_path / "nope.yaml")]), tmp_path / "nope.yaml", "(file)"
    )
    assert_one_line_error(capsys, submit_study.main(["--exp_id", "../etc"]), "--exp_id", "exp_id")


def test_bad_flag_value_is_refused_like_bad_yaml(experiment, capsys):
    code = submit_study.main(["--config", str(experiment), "--walltime", "2 hours", "--no-submit_jobs"])
    assert_one_line_error(capsys, code, "--walltime", "slurm.walltime")  # the flag is named, not the YAML
    code = submit_study.main(["--config", str(experiment), "--signal_grace", "900", "--no-submit_jobs"])
    assert_one_line_error(capsys, code, "--signal_grace", "slurm.signal_grace")  # 900 s of a 10-minute walltime


def test_worker_refuses_bad_config_with_status_2(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp", {"search_space.model.d_pos": {"type": "int", "low": 9, "high": 1}})
    assert_one_line_error(capsys, worker.main(["--config", str(path)]), path, "search_space.model.d_pos")


def test_existing_study_and_files_untouched_by_a_bad_resubmission(experiment, capsys):
    assert submit_study.main(["--config", str(experiment), "--no-submit_jobs"]) == 0
    run = experiment.parent / "runs" / "tiny"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    for bad in (["--n_trials", "0"], ["--gpu_type", "a100 --wrap=id"], ["--optimization_metric", "nope"]):
        assert submit_study.main(["--config", str(experiment), "--no-submit_jobs", *bad]) == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_run_directory_is_private(experiment):
    assert submit_study.main(["--config", str(experiment), "--no-submit_jobs"]) == 0
    mode = stat.S_IMODE(os.stat(experiment.parent / "runs" / "tiny").st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_missing_data_directory_is_refused(tmp_path, capsys):
    """A trainer without prepare() needs data.dir to exist already."""
    path = write_experiment(tmp_path / "exp", {"study.trainer": "noprep:train", "data.dir": "no_such_dir"})
    (path.parent / "noprep.py").write_text("def train(config, trial):\n    return {'val_mae_mean': 1.0}\n")
    code = submit_study.main(["--config", str(path), "--no-submit_jobs"])
    err = assert_one_line_error(capsys, code, path, "data.dir")
    assert "no_such_dir does not exist" in err
    assert not (tmp_path / "exp" / "runs").exists()


def test_a_missing_database_driver_names_its_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if psycopg2-binary were not installed
    path = write_experiment(tmp_path / "exp", {"study.storage": "postgresql+psycopg2://bob:pw@127.0.0.1:1/optuna"})
    code = submit_study.main(["--config", str(path), "--no-submit_jobs"])
    err = assert_one_line_error(capsys, code, path, "study.storage")
    assert err.endswith("fix: pip install psycopg2-binary"), err


def test_a_count_searched_as_floats_is_warned_at_submit(tmp_path, capsys):
    path = write_experiment(tmp_path / "exp", {"search_space.model.d_pos": {"type": "float", "low": 2, "high": 12}})
    assert submit_study.main(["--config", str(path), "--no-submit_jobs"]) == 0
    err = capsys.readouterr().err
    assert "search_space.model.d_pos samples floats, but the YAML's model.d_pos is the int 2; type: int" in err
    assert "training.lr" not in err, "a float searched as floats is no mismatch"


def test_what_is_no_mistake_still_loads(tmp_path):
    """Merge keys that override a key, and a resource left empty for the cluster's default."""
    merged = "defaults: &adam {name: adam, lr: 0.001}\nopt: &opt\n  <<: *adam\n  lr: 0.0003\nfinetune:\n  <<: *opt\n"
    assert read_yaml(merged)["finetune"] == {"name": "adam", "lr": 0.0003}
    path = write_experiment(tmp_path / "exp", {"slurm.mem_per_cpu": None, "study.enqueue_base": None})
    assert "--mem-per-cpu" not in array_file.sbatch_directives(load_config(path)["slurm"])
