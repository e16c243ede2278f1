"""Look at a study: static plots (`make report`) and the live dashboard (`make dashboard`).

    python submit_study.py --config X --report            # PNGs in runs/<study>/report/, the study's artifacts
    python submit_study.py --config X --dashboard [PORT]  # optuna-dashboard on 127.0.0.1, read-only

Both need an optional extra (requirements-extras.txt): matplotlib for the report, optuna-dashboard
for the dashboard. The timeline marks what Optuna's own plot cannot show: a trial resumed after a
requeue is one bar from its first start, so the report reads each requeued trial's worker.log and
draws the time its task waited in the queue (hatched) and where it resumed (a triangle), and links
each retry to the failed trial it continues (dotted).
"""

import getpass
import importlib
import re
import signal
import socket
import sys
import threading
import warnings
from datetime import datetime
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from parallel_optuna import artifacts
from parallel_optuna import attributes as attr
from parallel_optuna.config import metric_names
from parallel_optuna.options import ConfigError
from parallel_optuna.run_dir import run_dir, run_subdir
from parallel_optuna.storage import optuna_internals

# worker.py's log lines (LOG_FORMAT): every run of a trial logs its params; a run cut short by a requeue, this.
RUN = re.compile(r"^(\S+ \S+) \w+ worker: trial \d+ params:")
STOP = re.compile(r"^(\S+ \S+) \w+ worker: trial \d+ checkpointed (before the walltime|after SIGTERM)")
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


def extra(module, flag):
    """Import an optional extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.replace("_", "-")
        raise ConfigError(
            flag,
            package,
            "is not installed (an optional extra)",
            f"pip install -r requirements-extras.txt (or pip install {package})",
        ) from None


# ---------------------------------------------------------------- the report
def write_report(study, config):
    """One PNG per plot in runs/<study>/report/, each registered as a study artifact (in place: no copy);
    a plot that cannot be drawn yet is skipped with the reason. Axes are named by the study's metrics."""
    matplotlib = extra("matplotlib", "--report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    folder = run_subdir(config, "report")
    names = metric_names(config, study)
    known = len(names) == len(study.directions)  # a study made by hand may have other objectives than the YAML
    named = {"target_name": names[0]} if known and len(names) == 1 else {}  # several: each plot needs a target
    plots = {
        "optimization_history": lambda s: vis.plot_optimization_history(s, **named),
        "param_importances": lambda s: vis.plot_param_importances(s, **named),  # PED-ANOVA (default): numpy only
        "parallel_coordinate": lambda s: vis.plot_parallel_coordinate(s, **named),
        "intermediate_values": vis.plot_intermediate_values,  # the learning curves the pruner saw
        "timeline": lambda s: timeline(s, config),
    }
    if len(study.directions) > 1:
        plots["pareto_front"] = lambda s: vis.plot_pareto_front(s, **({"target_names": names} if known else {}))
    print(f"report of study {study.study_name} ({len(study.trials)} trials): {folder}/ (each plot a study artifact)")
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # matplotlib's notes on an axis of one value: the plot is still right
                warnings.simplefilter("ignore", UserWarning)
                axes = plot(study)
        except Exception as e:  # too few trials, no params yet: the other plots still come
            print(f"  {name}: skipped ({type(e).__name__}: {e})")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        artifacts.register_report_file(study, folder / f"{name}.png")
        print(f"  {name}.png")
    return 0


def timeline(study, config):
    """Optuna's timeline (one bar per trial, from its first start) with the array's requeues and retries marked."""
    import optuna.visualization.matplotlib as vis

    ax = vis.plot_timeline(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    drawn = set()
    for t in trials.values():
        for stop, resume in requeue_gaps(t, config):
            ax.barh(t.number, resume - stop, left=stop, color="white", hatch="////", edgecolor="grey")
            ax.plot(resume, t.number, ">", color="black", markersize=5)
            drawn.add("requeue")
        origin = trials.get(t.user_attrs.get(attr.RETRY_OF))
        if origin and origin.datetime_complete and t.datetime_start:
            ax.plot([origin.datetime_complete, t.datetime_start], [origin.number, t.number], ":", color="grey")
            drawn.add("retry")
    if drawn:
        add_legend(ax, drawn)
    return ax


def add_legend(ax, drawn):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = list(ax.get_legend().legend_handles) if ax.get_legend() else []
    if "requeue" in drawn:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="////", label="queued after a requeue"))
        handles.append(Line2D([], [], marker=">", color="black", linestyle="", label="resumed"))
    if "retry" in drawn:
        handles.append(Line2D([], [], linestyle=":", color="grey", label="retry of a failed trial"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.05, 1.0))


def requeue_gaps(trial, config):
    """(stopped, resumed) times of a trial that SLURM requeued, from its worker.log."""
    if not (trial.user_attrs.get(attr.REQUEUES) or trial.user_attrs.get(attr.SLURM_RESTART_COUNT)):
        return []  # only requeued trials: their log is read, no other
    log = Path(trial.user_attrs.get(attr.LOG_PATH) or run_dir(config) / "trials" / str(trial.number) / "worker.log")
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    runs = [log_time(m[1]) for m in map(RUN.match, lines) if m]
    stops = [log_time(m[1]) for m in map(STOP.match, lines) if m]
    gaps = []
    for resumed in runs[1:]:  # each run after the first is a resume
        before = [s for s in stops if s < resumed]
        gaps.append((before[-1] if before else resumed, resumed))
    return gaps


def log_time(text):
    return datetime.strptime(text, LOG_TIME)


# ---------------------------------------------------------------- the dashboard
def this_node():
    """This machine's full name: a cluster's login alias may lead to another login node."""
    name = socket.getfqdn()
    return socket.gethostname() if name.startswith("localhost") else name


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # the dashboard polls every few seconds: no line per request
        pass


def read_only(app):
    """The dashboard's API is unauthenticated and can delete studies and tell trials: only GET and HEAD pass."""

    def guarded(environ, start_response):
        if environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            return app(environ, start_response)
        start_response("403 Forbidden", [("Content-Type", "text/plain")])
        return [b"read-only dashboard: change the study with submit_study.py\n"]

    return guarded


class GoneAsHttp:
    """The study's artifact store for the dashboard: a registered file that is gone (deleted by the checkpoint
    clean) answers 410 Gone with the reason, where the dashboard would answer an error page (500)."""

    def __init__(self, store):
        self.store = store

    def open_reader(self, artifact_id):
        from bottle import HTTPResponse  # optuna-dashboard's web framework: a raised response is sent as it is

        try:
            return self.store.open_reader(artifact_id)
        except artifacts.ArtifactNotFound as e:
            raise HTTPResponse(f"{e}\n", status=410, headers={"Content-Type": "text/plain"}) from None

    def write(self, artifact_id, content_body):
        self.store.write(artifact_id, content_body)

    def remove(self, artifact_id):
        self.store.remove(artifact_id)


def serve_dashboard(study, config, port):
    """optuna-dashboard on 127.0.0.1 over the study's own storage object (the journal's own lock), until Ctrl-C;
    its artifact tab lists the trials' weights and checkpoints and the report's plots (artifacts.py)."""
    dashboard = extra("optuna_dashboard", "--dashboard")
    store = GoneAsHttp(artifacts.store(config))
    app = read_only(dashboard.wsgi(optuna_internals.storage_of(study), artifact_store=store))
    try:
        server = make_server("127.0.0.1", port, app, handler_class=QuietHandler)
    except OSError as e:
        raise ConfigError(
            "--dashboard", "PORT", f"cannot listen on 127.0.0.1:{port} ({e.strerror})", "pass another port, or 0"
        ) from None
    port = server.server_port  # the one the system chose for 0
    print(
        f"dashboard of study {study.study_name}: http://127.0.0.1:{port}/dashboard (read-only; Ctrl-C stops it)\n"
        f"from your laptop (to this very node): ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{this_node()}\n"
        f"  then open http://127.0.0.1:{port}/dashboard"
    )
    sys.stdout.flush()

    def stop(signum, frame):
        # Not a KeyboardInterrupt: one raised while a response is being written is caught and logged
        # by wsgiref, and the server would go on serving. shutdown() waits for the loop, so not here.
        threading.Thread(target=server.shutdown, name="dashboard-stop").start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
