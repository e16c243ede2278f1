"""The small jobs around an array: the submitter (--as_job, and the next part under a submit limit), and the
finish job that exports the best trial."""

import os
import sys

from parallel_optuna import PROJECT, slurm, study_control
from parallel_optuna.array_file import DEPENDENCY
from parallel_optuna.run_dir import run_subdir, trusted_run_dir
from parallel_optuna.slurm import quote_command

SUBMIT_TEMPLATE = PROJECT / "templates" / "submit_job.sbatch"
FINISH_TEMPLATE = PROJECT / "templates" / "finish_job.sbatch"

FINISH_STEPS = [["--status"], ["--export_best"]]  # what the finish job runs; add ["--report"] here once it exists


def render_job(template, config, filename, **fields):
    """A small job file in the run directory, from one of templates/."""
    slurm_keys, folder = config["slurm"], trusted_run_dir(config)
    run_subdir(config, "slurm_logs")
    directives = [f"#SBATCH --{key}={slurm_keys[key]}" for key in ("partition", "account", "qos") if slurm_keys[key]]
    script = folder / filename
    script.write_text(
        template.read_text().format(
            study_name=config["study"]["study_name"],
            log_dir=folder / "slurm_logs",
            workdir=quote_command([os.getcwd()]),
            directives="\n".join(directives + fields.pop("directives", [])),
            setup="\n".join(slurm_keys["setup"]) or "# (none)",
            **fields,
        )
    )
    return script


def submit_job(config, argv, storage_file, filename="submit_job.sbatch"):
    """A job file that runs this same submit (without --as_job), its storage URL by reference."""
    command = [python_in_jobs(config), PROJECT / "submit_study.py", *job_arguments(argv, storage_file)]
    return render_job(
        SUBMIT_TEMPLATE,
        config,
        filename,
        job_name=study_control.submit_job_name(config["study"]["study_name"]),
        command=quote_command(command),
    )


def submit_next_part(config, argv, storage_file, after):
    """The job that submits the rest of the study once the arrays `after` have ended; its id, or None."""
    argv = [*argv, "--next_part"] if "--next_part" not in argv else argv
    script = submit_job(config, argv, storage_file, "next_part_job.sbatch")
    waits = [f"{DEPENDENCY}{':'.join(after)}"] if after else []
    result = slurm.sbatch(["sbatch", "--parsable", *waits, str(script)])
    if result.returncode != 0:
        print(f"error: sbatch {script} failed: {' '.join(result.stderr.split())}", file=sys.stderr)
        return None
    return result.stdout.strip().split(";")[0]


def python_in_jobs(config):
    return "python" if config["slurm"]["setup"] else sys.executable  # setup lines bring their own environment


def job_arguments(argv, storage_file):
    """The command line for the job: without --as_job, and a storage URL (it may hold a password) by reference."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--storage", "--storage_file"):
            skip = True  # and its value
        elif word != "--as_job" and not word.startswith(("--storage=", "--storage_file=")):
            words.append(word)
    return words + (["--storage_file", str(storage_file)] if storage_file else [])


def submit_finish_job(study, config):
    """--notify_on_finish: one small job once every array task of the study has ended."""
    name, slurm_keys = f"optuna_finish_{study.study_name}", config["slurm"]
    slurm.run(["scancel", "--me", f"--name={name}", "--state=PENDING"])  # it replaces an earlier one
    which = ["--config", config.path, "--study_name", study.study_name]
    which += ["--runs_dir", config["study"]["runs_dir"]]
    steps = [quote_command([python_in_jobs(config), PROJECT / "submit_study.py", *which, *s]) for s in FINISH_STEPS]
    mail = (
        ["#SBATCH --mail-type=END,FAIL", f"#SBATCH --mail-user={slurm_keys['mail_user']}"]
        if slurm_keys["mail_user"]
        else []
    )
    script = render_job(
        FINISH_TEMPLATE, config, "finish_job.sbatch", job_name=name, directives=mail, commands="\n".join(steps)
    )
    arrays = sorted(study_control.queued_arrays(study))
    job = slurm.run(["sbatch", "--parsable", f"{DEPENDENCY}{':'.join(arrays)}", str(script)]).strip()
    print(f"submitted finish job {job}: exports the best trial once arrays {', '.join(arrays)} have ended")
