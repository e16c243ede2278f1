"""Every attribute the tool stores on a trial or a study, named once (as OPTIONS names every option).

Liveness, status, retries and the report read what the worker and the submit write: each name lives
here, and the rest of the tool asks for it by its constant.
"""

# ---------------------------------------------------------------- trial user attributes: who runs it, where
HOST = "host"
PID = "pid"
PID_START = "pid_start"  # the worker's start time in clock ticks: a recycled pid is not taken for it
STARTED_AT = "started_at"
FINISHED_AT = "finished_at"
CONFIG_PATH = "config_path"  # the resolved config.yaml the trial trained with
CONFIG_VERSION = "config_version"
LOG_PATH = "log_path"
SLURM_TASK = "slurm_task"  # "<array job>_<task>", what liveness asks squeue about
SLURM_TASK_SHARE = "slurm_task_share"  # trials its array task runs in all: its own and dead tasks' it took over
SLURM_ARRAY_JOB_ID = "slurm_array_job_id"
SLURM_ARRAY_TASK_ID = "slurm_array_task_id"
SLURM_JOB_ID = "slurm_job_id"
SLURM_RESTART_COUNT = "slurm_restart_count"
SLURM_OUT = "slurm_out"
SLURM_ERR = "slurm_err"
NODE = "node"
CUDA_VISIBLE_DEVICES = "cuda_visible_devices"

# ---------------------------------------------------------------- trial user attributes: how it went
METRICS = "metrics"
TRAIN_SECONDS = "train_seconds"
FAIL_REASON = "fail_reason"
REQUEUES = "requeues"
RETRY_OF = "retry_of"  # the trial a retry replaces: retry_history[-1]
RETRY_ATTEMPT = "retry_attempt"
RESULT_OF = "result_of"  # a result kept for a trial failed under a worker that lived
DUPLICATE_OF = "duplicate_of"  # a repeated config answered from its twin
BASELINE = "baseline"  # the YAML's own values, enqueued first (study.enqueue_base)

# What the tool records on a trial: liveness, status and retries trust them, so an objective may not set them.
TOOL_ATTRS = {
    *(HOST, PID, PID_START, STARTED_AT, FINISHED_AT, CONFIG_PATH, CONFIG_VERSION, LOG_PATH),
    *(SLURM_TASK, SLURM_TASK_SHARE, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, SLURM_JOB_ID, SLURM_RESTART_COUNT),
    *(SLURM_OUT, SLURM_ERR, NODE, CUDA_VISIBLE_DEVICES, METRICS, TRAIN_SECONDS, FAIL_REASON),
    *(RETRY_OF, RETRY_ATTEMPT, REQUEUES),
}

# ---------------------------------------------------------------- trial system attributes: Optuna's retry markers
FAILED_TRIAL = "failed_trial"  # the first trial of a retry chain (RetryHeartbeatStaleTrialCallback)
RETRY_HISTORY = "retry_history"  # the chain, oldest first, the replaced trial last

# ---------------------------------------------------------------- study user attributes
N_TRIALS = "n_trials"  # the budget of the last submit (study.study_budget decides)
N_TRIALS_IN_YAML = "n_trials_in_yaml"  # the YAML's n_trials at that submit: an edit since wins
MAX_CONCURRENT_JOBS = "max_concurrent_jobs"  # the throttle in force (--throttle, later submits keep it)
OPTIMIZATION_METRIC = "optimization_metric"
ARRAY_JOBS = "array_jobs"  # [{job_id, tasks, submitted_at}] of every array the submit made
CONTROL = "control"  # paused, cancelled or None
NEXT_PART = "next_part"  # {tasks, limit, job_id, recorded_at}: what a submit limit held back, and who submits it
FAILURES_RESET_AT = "failures_reset_at"  # a submit's time, which lets trials start again after a failing streak
