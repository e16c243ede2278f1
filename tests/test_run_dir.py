"""The run directory is checked, not assumed: whoever could plant or swap runs/<study> would own the study."""

import os
import shutil
import stat
import subprocess

import pytest
from conftest import plugin_experiment, run_script, write_experiment

import submit_study
import worker

OTHER_USER = "po_teammate"  # a second account, created by the test where it is missing


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ") and "fix: " in err, err
    assert all(word in err for word in words), err
    return err


@pytest.fixture(scope="module")
def other_uid():
    """The uid of another user: made with useradd (root only)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true: the owner check must be tested, and that needs root (useradd, chown)")
        pytest.skip("not root: cannot create a second user (useradd) nor hand it a folder (chown)")
    if subprocess.run(["id", "-u", OTHER_USER], capture_output=True).returncode != 0:
        made = subprocess.run(["useradd", "--no-create-home", OTHER_USER], capture_output=True, text=True)
        assert made.returncode in (0, 9), made.stderr  # 9: made meanwhile by a test run beside this one
    return int(subprocess.run(["id", "-u", OTHER_USER], capture_output=True, text=True, check=True).stdout)


def test_a_run_directory_that_is_a_symlink_is_refused_by_every_command(experiment, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (experiment.parent / "runs").mkdir()
    (experiment.parent / "runs" / "tiny").symlink_to(elsewhere)
    folder = experiment.parent / "runs" / "tiny"
    code = submit_study.main(["--config", str(experiment), "--no-submit_jobs"])
    one_line_error(capsys, code, str(folder), "symlink", "study.runs_dir")
    one_line_error(capsys, worker.main(["--config", str(experiment)]), "symlink")
    one_line_error(capsys, submit_study.main(["--config", str(experiment), "--status"]), "symlink")
    assert list(elsewhere.iterdir()) == [], "nothing was written through the link"


def test_a_run_directory_of_another_user_is_refused_for_writing_and_read_for_status(experiment, other_uid, capsys):
    assert submit_study.main(["--config", str(experiment), "--no-submit_jobs", "--group_access"]) == 0
    folder = experiment.parent / "runs" / "tiny"
    for path in [folder, *folder.rglob("*")]:
        os.lchown(path, other_uid, -1)
    capsys.readouterr()
    code = submit_study.main(["--config", str(experiment), "--no-submit_jobs"])
    one_line_error(capsys, code, str(folder), f"belongs to {OTHER_USER}", "--runs_dir")
    one_line_error(capsys, worker.main(["--config", str(experiment)]), f"belongs to {OTHER_USER}")
    one_line_error(capsys, submit_study.main(["--config", str(experiment), "--pause"]), f"belongs to {OTHER_USER}")
    assert submit_study.main(["--config", str(experiment), "--status"]) == 0, "a teammate's study can be read"
    folder.chmod(0o777)
    code = submit_study.main(["--config", str(experiment), "--status"])
    one_line_error(capsys, code, "writable by others", f"{OTHER_USER} runs: chmod o-rwx {folder}")
    assert mode(folder) == 0o777, "another user's folder is left as it is"


def test_a_run_directory_of_ours_that_is_too_open_is_closed_with_a_note(experiment):
    folder = experiment.parent / "runs" / "tiny"
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # made by an older version, or by hand
    out = run_script("submit_study.py", "--config", experiment, "--no-submit_jobs")
    assert out.returncode == 0, out.stderr
    assert mode(folder) == 0o700
    notes = [line for line in out.stderr.splitlines() if str(folder) in line]
    assert notes == [f"note: {folder} was mode 0777, too open for a run directory: now 0700"], out.stderr
    again = run_script("submit_study.py", "--config", experiment, "--no-submit_jobs")
    assert str(folder) not in again.stderr, "said once"


def test_with_group_access_and_umask_002_no_folder_is_group_writable(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1})
    old = os.umask(0o002)  # what many clusters set for shared project folders
    try:
        out = run_script("submit_study.py", "--config", path, "--no-submit_jobs", "--group_access")
        assert out.returncode == 0, out.stderr
        out = run_script("submit_study.py", "--config", path, "--local", 1, "--group_access")
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    finally:
        os.umask(old)
    folder = path.parent / "runs" / "tiny"
    made = [folder.parent, folder, *(p for p in folder.rglob("*") if p.is_dir())]
    assert {folder / "slurm_logs", folder / "trials", folder / "trials" / "0"} <= set(made)
    assert {str(p.relative_to(path.parent)): oct(mode(p)) for p in made if mode(p) != 0o750} == {}
    # Nor any file: a group-writable trials/<n>/config.yaml could name other code for the retrain of make best.
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert folder / "trials" / "0" / "config.yaml" in files and folder / "journal.log" in files
    assert {str(p.relative_to(folder)): oct(mode(p)) for p in files if mode(p) & 0o022} == {}


def test_without_group_access_the_folders_are_private_whatever_the_umask(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 1})
    old = os.umask(0o002)
    try:
        assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    finally:
        os.umask(old)
    folder = path.parent / "runs" / "tiny"
    assert {oct(mode(p)) for p in [folder.parent, folder, *folder.rglob("*")] if p.is_dir()} == {"0o700"}
    shutil.rmtree(folder)
