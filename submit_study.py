"""Create (or load) an Optuna study and run it as a SLURM job array, one trial per task.

    python submit_study.py --exp_id baseline_LSTM_ishigami_cat      # submit: experiments/<id>/config.yaml
    python submit_study.py --config config.example.yaml --no-submit_jobs   # dry run: write and print
    python submit_study.py --config config.example.yaml --local 2   # no SLURM: 2 worker processes here
    python submit_study.py --config config.example.yaml --status    # trials, budget, best, SLURM tasks
    python submit_study.py --config config.example.yaml --export_best   # best_trial.yaml + best_trial.pt
    python submit_study.py --config config.example.yaml --report        # plots in runs/<study>/report/
    python submit_study.py --config config.example.yaml --dashboard 8080   # optuna-dashboard, 127.0.0.1 only
    python submit_study.py --config config.example.yaml --as_job    # a small job submits the array
    python submit_study.py --config config.example.yaml --throttle 2   # or --pause, --resume, --cancel

Submitting again with the same study name resumes the study: the array asks only for the trials
still missing (n_trials - finished - running), so a re-submission tops up what was lost and a larger
--n_trials extends a finished study. Every study/slurm key of the YAML has a flag of the same name.
"""

import argparse
import os
import signal
import sys

import optuna

from parallel_optuna import config_versions, report, study_control
from parallel_optuna.config import config_from_args, yaml_from_args
from parallel_optuna.doctor import check_storage
from parallel_optuna.export import export_best
from parallel_optuna.options import (
    CommandLine,
    ConfigError,
    add_experiment_flags,
    flag_overrides,
)
from parallel_optuna.run_dir import full_filesystem, full_filesystem_error, run_dir
from parallel_optuna.slurm import SlurmError
from parallel_optuna.status import show_status
from parallel_optuna.study import (
    open_existing_study,
    storage_url,
)
from parallel_optuna.submit import submit, submit_as_job


def parse_args(argv=None):
    parser = CommandLine(description=__doc__.split("\n\n")[0])
    add_experiment_flags(parser, ("study", "slurm"))
    parser.add_argument("--cluster", action="store_true", help="stage the data to $SCRATCH (or --scratch) first")
    parser.add_argument(
        "--submit_jobs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-submit_jobs: dry run, write and print the array file and sbatch command only",
    )
    parser.add_argument("--local", type=int, metavar="K", help="run the study here with K worker processes")
    parser.add_argument("--group_access", action="store_true", help="let the group read the run directory")
    parser.add_argument("--status", action="store_true", help="show the study and its SLURM tasks")
    parser.add_argument("--trial", type=int, metavar="N", help="with --export_best: export trial N (a Pareto member)")
    parser.add_argument(
        "--check_storage",
        action="store_true",
        help="report torn journal lines, a stale journal lock and RUNNING trials without a worker",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="with --check_storage: back up, then fix them (the journal is rewritten only while no worker lives)",
    )
    parser.add_argument(
        "--export_best",
        nargs="?",
        const="",
        metavar="PATH",
        help="write the best trial (default: best_trial.yaml beside the experiment YAML) and its weights (.pt)",
    )
    parser.add_argument("--report", action="store_true", help="plots of the study as PNGs in runs/<study>/report/")
    parser.add_argument(
        "--dashboard", nargs="?", const=8080, type=int, metavar="PORT", help="optuna-dashboard on 127.0.0.1:PORT"
    )
    parser.add_argument("--as_job", action="store_true", help="submit from a small SLURM job (1 CPU, 4G, 1 h)")
    parser.add_argument(
        "--next_part",
        action="store_true",
        help="what the job a submit limit chains runs: the rest, unless the trainer failed every trial since",
    )
    parser.add_argument(
        "--storage_file", help="file holding the storage URL, instead of --storage (keeps a password off command lines)"
    )
    parser.add_argument(
        "--notify_on_finish",
        action=argparse.BooleanOptionalAction,
        help="once every task has ended, a small job exports the best trial [slurm.notify_on_finish]",
    )
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--throttle", type=int, metavar="K", help="at most K tasks of the study at once, from now")
    control.add_argument("--pause", action="store_true", help="hold queued tasks; running trials finish")
    control.add_argument("--resume", action="store_true", help="release a paused study")
    control.add_argument("--cancel", action="store_true", help="stop the study now; submit again to continue it")
    return parser.parse_args(argv)


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--status | head` ends quietly
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    os.umask(os.umask(0) | 0o022)  # no file of the run directory writable by the group or others
    controls = args.throttle is not None or args.pause or args.resume or args.cancel
    config = None
    try:
        read_storage_file(args)
        check_flags(args)
        looking = args.status or args.export_best is not None or args.report or args.dashboard is not None
        if looking or controls or args.check_storage:
            config = config_versions.load(yaml_from_args(args), flag_overrides(args))  # works mid-edit too
            if args.check_storage:
                return check_storage(config, args.repair)
            study = open_existing_study(config, reading=not controls)  # a teammate may look, not steer
            return control(args, study, config) if controls else look(args, study, config)
        if args.as_job:
            return submit_as_job(args, config_from_args(args), argv)
        config = config_from_args(args)  # bound for the full-filesystem message below
        return submit(args, config, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SlurmError as e:  # the scheduler's answer, not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:  # a teammate's command on a study it may read but not write
        fix = "run it as the study's owner (the owner's --group_access lets the group read it)"
        print(f"error: {e.filename or e}: permission denied; fix: {fix}", file=sys.stderr)
        return 2
    except OSError as e:
        if not full_filesystem(e):
            raise
        where = run_dir(config) if config else "the run directory"
        print(full_filesystem_error(e, where, "then run the same command again"), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def check_flags(args):
    if args.repair and not args.check_storage:
        raise ConfigError("--repair", "repair", "works only with --check_storage", "pass --check_storage --repair")
    if args.trial is not None and args.export_best is None:
        raise ConfigError("--trial", "trial", "works only with --export_best", "pass --export_best --trial N")


def read_storage_file(args):
    """--storage_file (what --as_job hands its job): the URL, from here on as if given by --storage."""
    if args.storage_file:
        if args.storage:
            raise ConfigError("--storage_file", "storage_file", "given with --storage", "pass one of them")
        args.storage = storage_url(None, args.storage_file)


def look(args, study, config):
    if args.report:
        return report.write_report(study, config)
    if args.dashboard is not None:
        return report.serve_dashboard(study, config, args.dashboard)
    return show_status(study, config) if args.status else export_best(study, config, args.export_best, args.trial)


def control(args, study, config):
    """--throttle K, --pause, --resume, --cancel: act on every array of the study (study_control.py)."""
    if args.throttle is not None:
        if args.throttle < 1:
            raise ConfigError("--throttle", "throttle", f"{args.throttle} tasks", "pass --throttle 1 or more")
        return study_control.throttle(study, args.throttle)
    if args.pause:
        return study_control.pause(study)
    return study_control.resume(study) if args.resume else study_control.cancel(study)


if __name__ == "__main__":
    sys.exit(main())
