"""SLURM: every command the tool runs against the scheduler, each with a timeout and a checked status."""

import shlex
import socket


def quote_command(words):
    return " ".join(shlex.quote(str(w)) for w in words)


def hostname():
    return socket.gethostname()
