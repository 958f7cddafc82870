"""systemd socket activation: serve the listening socket a service manager passed on fd 3.

The convention (sd_listen_fds(3)): the manager binds and listens, then starts us with the
socket on fd 3 (SD_LISTEN_FDS_START), ``LISTEN_FDS`` the number of sockets passed and
``LISTEN_PID`` our PID, so that a child that inherits the environment does not take the
sockets for its own. systemd, ``systemd-socket-activate`` and other managers do the same.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import MutableMapping

LISTEN_FDS_START = 3
ACTIVATION_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
FAMILY_NAMES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}


class ActivationError(Exception):
    """The environment asks for socket activation but fd 3 cannot serve; str() is one line."""


def listen_socket_from_env(
    environ: MutableMapping[str, str] = os.environ,
) -> socket.socket | None:
    """Return the listening socket passed on fd 3, or None when none was passed to us.

    None when ``LISTEN_FDS`` is unset or ``LISTEN_PID`` is not this process's PID. Else
    fd 3 must be a listening TCP socket (AF_INET or AF_INET6, SOCK_STREAM, SO_ACCEPTCONN);
    it comes back non-blocking and close-on-exec. The activation variables are removed
    from ``environ`` in every case, so that no child inherits them. Raises
    ``ActivationError`` when the variables are malformed, name other than one socket, or
    fd 3 is not such a socket; fd 3 is then left open and untouched.
    """
    try:
        if not passed_to_us(environ):
            return None
        check_socket_count(environ["LISTEN_FDS"])
    finally:
        for name in ACTIVATION_VARIABLES:
            environ.pop(name, None)
    return adopt_socket(LISTEN_FDS_START)


def passed_to_us(environ: MutableMapping[str, str]) -> bool:
    """True when ``LISTEN_FDS`` is set and ``LISTEN_PID`` names this process."""
    if "LISTEN_FDS" not in environ:
        return False
    pid = environ.get("LISTEN_PID")
    if pid is None:  # sd_listen_fds(3) takes this as "nothing passed"
        return False
    if not pid.isdigit():
        raise ActivationError(f"LISTEN_FDS is set but LISTEN_PID is {pid!r}, not a PID")
    return int(pid) == os.getpid()


def check_socket_count(value: str) -> None:
    """Raise unless ``LISTEN_FDS`` says exactly one socket was passed."""
    if not value.isdigit():
        raise ActivationError(f"LISTEN_FDS is {value!r}, not a number of sockets")
    if int(value) != 1:
        raise ActivationError(f"LISTEN_FDS={int(value)}: expected exactly one listening socket")


def adopt_socket(fd: int) -> socket.socket:
    """Wrap ``fd`` as a socket after checking it is a listening TCP socket; or raise."""
    check_is_socket(fd)
    sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    try:
        check_listening_tcp(sock)
    except ActivationError:
        sock.detach()  # not ours to close: leave fd 3 as we found it
        raise
    sock.setblocking(False)
    sock.set_inheritable(False)  # sd_listen_fds sets FD_CLOEXEC too
    return sock


def check_is_socket(fd: int) -> None:
    """Raise unless ``fd`` is open and is a socket."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise ActivationError(f"LISTEN_FDS=1 but fd {fd} is not open") from exc
        raise ActivationError(f"cannot inspect fd {fd}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"fd {fd} is not a socket")


def check_listening_tcp(sock: socket.socket) -> None:
    """Raise unless ``sock`` is an AF_INET or AF_INET6 stream socket that listens."""
    fd = sock.fileno()
    if sock.family not in FAMILY_NAMES:
        family = getattr(sock.family, "name", sock.family)
        raise ActivationError(f"fd {fd} is an {family} socket, not AF_INET or AF_INET6")
    if sock.type != socket.SOCK_STREAM:
        kind = getattr(sock.type, "name", sock.type)
        raise ActivationError(f"fd {fd} is a {kind} socket, not SOCK_STREAM")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(f"fd {fd} is a TCP socket that is not listening")
