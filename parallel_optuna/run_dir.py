"""The run directory runs/<study>: where it is, whether it can be trusted, and the folders made in it."""

from __future__ import annotations

import errno
import os
import pwd
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from parallel_optuna.options import ConfigError

if TYPE_CHECKING:  # names for the hints only: importing them would make a cycle
    from parallel_optuna.config import Config


def run_dir(config: Config) -> Path:
    return Path(config["study"]["runs_dir"]) / config["study"]["study_name"]


def trusted_run_dir(
    config: Config, group_access: bool | None = None, reading: bool = False, create: bool = True
) -> Path:
    """The run directory, checked before anything in it is trusted; every opener of it calls this.

    It holds the storage (a journal snapshot is a pickle), the checkpoints and the array file, and
    study names are predictable: whoever makes runs/<study> first, or swaps it for a symlink, would
    own the study. So it must be a real folder, owned by this user, that nobody else may write in,
    and the group only with --group_access (group_access=None: the group's bits as the submission
    left them, which is what a worker keeps). One of ours that is too open (made by older versions,
    or chmod) is closed here, with a note. `reading` (status, export, report, dashboard, doctor):
    a teammate's folder is accepted too, but never a symlink nor one that others may write in.
    """
    folder = run_dir(config)
    if create and not reading:
        make_private_dirs(folder, 0o750 if group_access else 0o700, config)
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return folder  # nothing to trust yet: the caller says there is no study
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        what = f"a symlink to {os.readlink(folder)}" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise run_dir_error(config, f"{folder} is {what}", f"remove it (rm {folder}) or choose another --runs_dir")
    if info.st_uid != os.geteuid():
        return _teammates(config, folder, info, reading)
    _close(config, folder, info.st_mode, group_access)
    return folder


def _teammates(config, folder, info, reading):
    """Another user's run directory: read it (a teammate's, --group_access) unless others may write in it."""
    owner = user_name(info.st_uid)
    if not reading:
        fix = f"use a runs_dir of your own (--runs_dir DIR), or have {owner} remove {folder}"
        raise run_dir_error(config, f"{folder} belongs to {owner}, not to you", fix)
    if info.st_mode & 0o002:
        problem = f"{folder} (of {owner}) is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
        raise run_dir_error(config, problem, f"{owner} runs: chmod o-rwx {folder}")
    return folder


def _close(config, folder, mode, group_access):
    """Our run directory: others get nothing; the group reads with --group_access (and writes only where
    the owner let it), and nothing without it (None: as the submission left it). Said when closed."""
    mode = stat.S_IMODE(mode)
    if group_access is None:
        wanted = mode & 0o770
    else:
        wanted = (mode & 0o770) | 0o050 if group_access else mode & 0o700
    if wanted == mode:
        return
    try:
        os.chmod(folder, wanted)
    except OSError as e:
        fix = f"chmod {wanted:04o} {folder}"
        raise run_dir_error(config, f"{folder} is mode {mode:04o} and cannot be closed ({e.strerror})", fix) from None
    if mode & ~wanted:
        print(f"note: {folder} was mode {mode:04o}, too open for a run directory: now {wanted:04o}", file=sys.stderr)


def run_dir_error(config, problem, fix):
    return ConfigError(config.path, "study.runs_dir", problem, fix)


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def make_private_dirs(folder, mode, config=None):
    """Create folder and its missing parents with exactly `mode` (the umask does not widen nor narrow it)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # another worker made it: trusted_run_dir checks the run directory itself
        except OSError as e:
            if config is None:
                raise
            fix = "point runs_dir at a writable directory"
            raise run_dir_error(config, f"cannot create {path} ({e.strerror})", fix) from None
        os.chmod(path, mode)


def run_subdir(config: Config, *parts: str | int) -> Path:
    """A folder inside the run directory (trials/<n>, slurm_logs, report, ...): 0700, or 0750 where
    --group_access opened the run directory to the group; one left wider (older versions, a umask of
    002) is closed, since a teammate who can write there could swap a checkpoint."""
    top = run_dir(config)
    mode = 0o750 if os.stat(top).st_mode & 0o040 else 0o700
    folder = top.joinpath(*map(str, parts))
    make_private_dirs(folder, mode)
    for path in [top.joinpath(*map(str, parts[: i + 1])) for i in range(len(parts))]:
        info = os.lstat(path)
        if stat.S_IMODE(info.st_mode) & ~mode & 0o077 and info.st_uid == os.geteuid():
            os.chmod(path, mode)
    return folder


# The optional database drivers, by URL scheme: named in the error when one is missing.
FULL = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)"}


def full_filesystem(error: BaseException) -> bool:
    """A full disk or an exceeded quota: the filesystem's fault, neither the trial's nor the input's."""
    return isinstance(error, OSError) and error.errno in FULL


def full_filesystem_error(error: OSError, where: str | Path, consequence: str) -> str:
    """The one line a script exits with on a full filesystem: which file, what, the fix, what happens next."""
    return f"error: {error.filename or where}: {FULL[error.errno]}; fix: free space or raise the quota; {consequence}"
