"""The pidfile: written atomically at start, removed at a clean exit.

Safe where the server often runs as root: the temporary file is made by ``mkstemp``
(unpredictable name, ``O_EXCL``, never through a planted symlink), and a stale file
left by a SIGKILL or an OOM kill stops a restart only when the PID it names is a
running forkchat server (PIDs are reused).
"""

from __future__ import annotations

import os
import tempfile

from .proctitle import is_server_pid


class PidfileError(Exception):
    """The pidfile cannot be written, or names a running forkchat server."""


def write_pidfile(path: str) -> None:
    """Write our PID atomically. Raises PidfileError if the file names a running
    forkchat server, or cannot be written."""
    try:
        with open(path) as f:
            other = int(f.read().strip() or 0)
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid() and is_server_pid(other):
        raise PidfileError(f"pidfile {path} names running forkchat server {other}")
    folder, base = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", dir=folder)
    except OSError as exc:
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror or exc}") from None


def remove_pidfile(path: str) -> None:
    """Remove the pidfile if it still names us."""
    try:
        with open(path) as f:
            if int(f.read().strip()) == os.getpid():
                os.unlink(path)
    except (OSError, ValueError):
        pass
