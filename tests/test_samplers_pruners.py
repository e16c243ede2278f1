"""Every Optuna sampler and pruner by name from the YAML, objects in their YAML form, the baseline first."""

import json

import optuna
import pytest
from conftest import load_study, run_script, run_script_without, write_experiment

from parallel_optuna.config import load_config
from parallel_optuna.optimizer import build_pruner, build_sampler
from parallel_optuna.options import ConfigError

SPACE = {  # a finite grid: steps and choices
    "search_space.model.d_hidden": {"type": "categorical", "choices": [8, 16]},
    "search_space.training.lr": {"type": "float", "low": 0.005, "high": 0.02, "step": 0.005},
}
SAMPLERS = [
    {"name": "TPESampler", "multivariate": True, "constant_liar": True},
    {"name": "RandomSampler", "seed": 1},
    {"name": "BruteForceSampler"},
    {"name": "CmaEsSampler", "independent_sampler": {"name": "RandomSampler"}},
    {"name": "GridSampler"},
    {"name": "NSGAIISampler", "population_size": 10},
    {"name": "NSGAIIISampler"},
    {"name": "PartialFixedSampler", "fixed_params": {"training.lr": 0.01}, "base_sampler": {"name": "TPESampler"}},
    {"name": "QMCSampler", "qmc_type": "sobol"},
    {"name": "GPSampler"},
]
PRUNERS = [
    {"name": "MedianPruner", "n_warmup_steps": 1},
    {"name": "NopPruner"},
    {"name": "PercentilePruner", "percentile": 25.0},
    {"name": "SuccessiveHalvingPruner"},
    {"name": "HyperbandPruner", "max_resource": 10},
    {"name": "ThresholdPruner", "upper": 1.0},
    {"name": "PatientPruner", "wrapped_pruner": {"name": "MedianPruner"}, "patience": 2},
    {"name": "WilcoxonPruner", "p_threshold": 0.1},
]


def config_with(tmp_path, changes):
    return load_config(write_experiment(tmp_path / "exp", {**SPACE, **changes}))


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s["name"])
def test_every_sampler_by_name(tmp_path, spec):
    sampler = build_sampler(config_with(tmp_path, {"study.sampler": spec}), seed_offset=3)
    assert isinstance(sampler, getattr(optuna.samplers, spec["name"]))


@pytest.mark.parametrize("spec", PRUNERS, ids=lambda s: s["name"])
def test_every_pruner_by_name(tmp_path, spec):
    assert type(build_pruner(config_with(tmp_path, {"study.pruner": spec}))).__name__ == spec["name"]


def test_yaml_forms_of_objects(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {"name": "GridSampler"}})
    grid = build_sampler(config)._search_space
    assert grid["model.d_pos"] == [2, 4, 6, 8, 10, 12] and grid["model.d_hidden"] == [8, 16]
    assert grid["training.lr"] == [0.005, 0.01, 0.015, 0.02]
    patient = build_pruner(config_with(tmp_path, {"study.pruner": PRUNERS[6]}))
    assert type(patient._wrapped_pruner).__name__ == "MedianPruner"
    no_step = load_config(write_experiment(tmp_path / "log", {"study.sampler": {"name": "GridSampler"}}))
    with pytest.raises(ConfigError, match="search_space.training.lr: a float range without step has no grid"):
        build_sampler(no_step)


def test_grid_warning_and_the_baseline_first(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.enqueue_base": True, "study.n_trials": 1})
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0, out.stdout + out.stderr
    first = load_study(path).trials[0]
    assert first.params == {"model.d_pos": 2, "training.lr": 0.01} and first.user_attrs["baseline"] is True
    path = write_experiment(tmp_path / "bad", {"study.enqueue_base": True, "training.lr": 0.5})
    out = run_script("submit_study.py", "--config", path, "--no-submit_jobs")
    assert out.returncode == 2 and "training.lr: 0.5 lies outside search_space.training.lr" in out.stderr
    assert not (path.parent / "runs").exists()
    grid = write_experiment(tmp_path / "grid", {**SPACE, "study.sampler": {"name": "GridSampler"}})
    out = run_script("submit_study.py", "--config", grid, "--no-submit_jobs")
    assert out.returncode == 0, out.stderr
    assert "GridSampler: parallel workers may train the same grid point twice" in out.stderr


@pytest.mark.parametrize(
    "key, spec, module",
    [
        ("sampler", {"name": "QMCSampler"}, "scipy"),
        ("sampler", {"name": "CmaEsSampler"}, "cmaes"),
        ("pruner", {"name": "WilcoxonPruner"}, "scipy"),
    ],
)
def test_a_missing_extra_is_named_with_its_pip_command(tmp_path, key, spec, module):
    path = write_experiment(tmp_path / "exp", {f"study.{key}": spec})
    out = run_script_without(module, "submit_study.py", "--config", str(path), "--no-submit_jobs")
    assert out.returncode == 2 and f"study.{key}.name" in out.stderr and f"pip install {module}" in out.stderr
    assert out.stderr.count("\n") == 1 and not (path.parent / "runs").exists()


def test_a_worker_goes_on_past_an_exhausted_grid(tmp_path):
    grid = {
        "study.sampler": {"name": "GridSampler"},
        "study.n_trials": 3,
        "search_space.model.d_pos": {"type": "int", "low": 2, "high": 4, "step": 2},
        "search_space.training.lr": {"type": "float", "low": 0.01, "high": 0.01, "step": 0.01},
    }
    path = write_experiment(tmp_path / "exp", grid)
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    trials = load_study(path).trials
    assert sorted(t.params["model.d_pos"] for t in trials[:2]) == [2, 4], "both grid points trained"
    assert trials[2].state.name == "COMPLETE" and "duplicate_of" in trials[2].user_attrs, "the third is answered"


OWN = '''import json, os
import json

import optuna


class Recorded(optuna.samplers.RandomSampler):
    """A sampler of the user's: it writes down the seed each worker gave it."""

    def __init__(self, seed=None, note="plain"):
        super().__init__(seed=seed)
        with open(os.path.join(os.path.dirname(__file__), "seeds.jsonl"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "seed": seed, "note": note}) + "\\n")


class NeverPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return False


class NotASampler:
    pass
'''


def own_classes_experiment(tmp_path, sampler, pruner=None):
    changes = {"study.sampler": sampler, "study.n_trials": 4, "training.epochs": 1}
    path = write_experiment(tmp_path / "exp", {**SPACE, **changes, **({"study.pruner": pruner} if pruner else {})})
    (path.parent / "my_optuna.py").write_text(OWN)
    return path


def seeds(path):
    return [json.loads(line) for line in (path.parent / "seeds.jsonl").read_text().splitlines()]


def test_a_sampler_and_a_pruner_of_your_own_by_import_path(tmp_path):
    sampler = {"name": "my_optuna:Recorded", "seed": 7, "note": "mine"}
    path = own_classes_experiment(tmp_path, sampler, {"name": "my_optuna:NeverPrune"})
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = load_study(path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    workers = {t.user_attrs["pid"] for t in trials}
    by_worker = {s["pid"]: s["seed"] for s in seeds(path) if s["pid"] in workers and s["note"] == "mine"}
    assert len(by_worker) == 2 and len(set(by_worker.values())) == 2, "each worker seeds its sampler its own way"
    assert type(build_pruner(load_config(path))).__name__ == "NeverPrune"


def test_shared_seed_gives_every_worker_the_same_seed(tmp_path):
    path = own_classes_experiment(tmp_path, {"name": "my_optuna:Recorded", "seed": 7, "shared_seed": True})
    assert run_script("submit_study.py", "--config", path, "--local", 2).returncode == 0
    assert {s["seed"] for s in seeds(path)} == {7}


@pytest.mark.parametrize(
    "sampler, problem",
    [
        ({"name": "my_optuna:NotASampler"}, "'my_optuna:NotASampler' is not a subclass of optuna's BaseSampler"),
        ({"name": "nowhere:Sampler"}, "cannot import 'nowhere:Sampler' (ModuleNotFoundError"),
    ],
)
def test_a_class_that_is_no_sampler_or_a_missing_module_is_refused_at_submit(tmp_path, sampler, problem):
    path = own_classes_experiment(tmp_path, sampler)
    out = run_script("submit_study.py", "--config", path, "--no-submit_jobs")
    assert out.returncode == 2 and problem in out.stderr and "study.sampler.name" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (path.parent / "runs").exists()


HUB_INIT = (
    "from .sampler import LowestSampler\n\n__all__ = ['LowestSampler']\n"  # a relative import, as hub packages do
)
HUB_SAMPLER = """import optuna


class LowestSampler(optuna.samplers.RandomSampler):
    def sample_independent(self, study, trial, name, distribution):
        return distribution.choices[0] if hasattr(distribution, "choices") else distribution.low
"""


def hub_experiment(tmp_path, name):
    changes = {"study.sampler": {"name": name, "seed": 3}, "study.n_trials": 2, "training.epochs": 1}
    path = write_experiment(tmp_path / "exp", {**SPACE, **changes})
    package = path.parent / "registry/samplers/lowest"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(HUB_INIT)
    (package / "sampler.py").write_text(HUB_SAMPLER)
    return path


def test_an_optunahub_package_on_disk_samples_the_study(tmp_path):
    path = hub_experiment(tmp_path, "hub:registry/samplers/lowest:LowestSampler")
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = load_study(path).trials
    assert [t.params for t in trials] == [{"model.d_pos": 2, "model.d_hidden": 8, "training.lr": 0.005}] * 2


@pytest.mark.parametrize(
    "name, problem",
    [
        ("hub:registry/samplers/nothing:LowestSampler", "no OptunaHub package (an __init__.py) in "),
        ("hub:registry/samplers/lowest:Missing", "'hub:registry/samplers/lowest:Missing' is not a subclass of"),
        ("hub:registry/samplers/lowest", "names no package folder and class"),
    ],
)
def test_a_bad_optunahub_name_is_refused_at_submit(tmp_path, name, problem):
    out = run_script("submit_study.py", "--config", hub_experiment(tmp_path, name), "--no-submit_jobs")
    assert out.returncode == 2 and problem in out.stderr and "study.sampler.name" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_missing_optunahub_is_named_with_its_pip_command(tmp_path):
    path = hub_experiment(tmp_path, "hub:registry/samplers/lowest:LowestSampler")
    out = run_script_without("optunahub", "submit_study.py", "--config", str(path), "--no-submit_jobs")
    assert out.returncode == 2 and "pip install optunahub" in out.stderr and out.stderr.count("\n") == 1, out.stderr


HUB_PRUNER = """import optuna


class NeverPruner(optuna.pruners.NopPruner):
    pass
"""


def test_a_hub_sampler_and_a_hub_pruner_in_folders_of_the_same_name_stay_apart(tmp_path):
    # Both packages keep their code in a submodule of the same name, as OptunaHub packages often do.
    sampler = {"name": "hub:registry/samplers/lowest:LowestSampler", "seed": 3}
    config = config_with(
        tmp_path, {"study.sampler": sampler, "study.pruner": {"name": "hub:registry/pruners/lowest:NeverPruner"}}
    )
    for kind, code, name in (("samplers", HUB_SAMPLER, "LowestSampler"), ("pruners", HUB_PRUNER, "NeverPruner")):
        package = tmp_path / "exp/registry" / kind / "lowest"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"from ._impl import {name}\n")
        (package / "_impl.py").write_text(code)
    assert type(build_sampler(config)).__name__ == "LowestSampler"
    assert type(build_pruner(config)).__name__ == "NeverPruner"
    assert type(build_sampler(config)).__name__ == "LowestSampler", "the pruner's package replaced the sampler's"
