"""Socket activation: the environment convention in-process, fd 3 in real child processes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from forkchat.activation import ActivationError, adopt_socket, listen_socket_from_env

CHILD = """
import json, os, socket, sys
from forkchat.activation import ActivationError, listen_socket_from_env
try:
    sock = listen_socket_from_env()
except ActivationError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(1)
report = {"pid": os.getpid(), "none": sock is None}
if sock is not None:
    report.update(
        fd=sock.fileno(), address=list(sock.getsockname()[:2]), blocking=sock.getblocking(),
        inheritable=sock.get_inheritable(),
        left=sorted(k for k in os.environ if k.startswith("LISTEN_")),
    )
    sock.setblocking(True)
    sock.settimeout(10)
    conn, _ = sock.accept()  # the real listening socket: a waiting client is there
    conn.sendall(b"served\\n")
    conn.close()
print(json.dumps(report), flush=True)
"""


# ---- the environment, in this process (fd 3 is never touched) ------------------------


def test_without_listen_fds_there_is_nothing_to_serve():
    environ = {"PATH": "/bin"}
    assert listen_socket_from_env(environ) is None
    assert environ == {"PATH": "/bin"}


@pytest.mark.parametrize("pid", [None, "1"])
def test_variables_for_another_process_are_ignored_and_removed(pid):
    environ = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "chat", "HOME": "/"}
    if pid is not None:
        environ["LISTEN_PID"] = pid
    assert listen_socket_from_env(environ) is None
    assert environ == {"HOME": "/"}


@pytest.mark.parametrize(
    ("fds", "pid", "reason"),
    [
        ("2", "self", "LISTEN_FDS=2: expected exactly one"),
        ("0", "self", "LISTEN_FDS=0: expected exactly one"),
        ("one", "self", "LISTEN_FDS is 'one'"),
        ("1", "-5", "LISTEN_PID is '-5', not a PID"),
        ("1", "12x", "LISTEN_PID is '12x'"),
    ],
)
def test_malformed_or_plural_variables_are_one_line_errors(fds, pid, reason):
    environ = {"LISTEN_FDS": fds, "LISTEN_PID": str(os.getpid()) if pid == "self" else pid}
    with pytest.raises(ActivationError, match=reason) as info:
        listen_socket_from_env(environ)
    assert "\n" not in str(info.value)
    assert environ == {}


# ---- the descriptor checks, on descriptors of this process ---------------------------


def test_a_listening_tcp_socket_is_adopted_non_blocking_and_close_on_exec():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        fd = os.dup(listener.fileno())
        os.set_inheritable(fd, True)
        with adopt_socket(fd) as sock:
            assert sock.fileno() == fd
            assert sock.getsockname() == listener.getsockname()
            assert not sock.getblocking()
            assert not sock.get_inheritable()


def test_an_ipv6_listening_socket_is_adopted():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener, adopt_socket(os.dup(listener.fileno())) as sock:
        assert sock.family == socket.AF_INET6


def refusal_for(sock: socket.socket) -> str:
    """adopt_socket's reason for a duplicate of sock, checking it leaves the fd open."""
    fd = os.dup(sock.fileno())
    try:
        with pytest.raises(ActivationError) as info:
            adopt_socket(fd)
        os.fstat(fd)  # still open: a refused descriptor is not ours to close
    finally:
        os.close(fd)
    return str(info.value)


def test_a_udp_socket_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert "SOCK_DGRAM socket, not SOCK_STREAM" in refusal_for(udp)


def test_a_tcp_socket_that_does_not_listen_is_refused():
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        assert "not listening" in refusal_for(tcp)


def test_a_unix_socket_is_refused(tmp_path):
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "s"))
        unix.listen()
        assert "AF_UNIX socket, not AF_INET or AF_INET6" in refusal_for(unix)


def test_a_pipe_is_not_a_socket():
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ActivationError, match=f"fd {read_end} is not a socket"):
            adopt_socket(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_closed_descriptor_is_refused():
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(ActivationError, match=f"fd {read_end} is not open"):
        adopt_socket(read_end)


# ---- real children with an inherited fd 3 --------------------------------------------


TRAMPOLINE = """
import os, sys
fd, pid = int(sys.argv[1]), sys.argv[2]
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=pid or str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def run_child(tmp_path, passed: socket.socket, pid: str = "") -> subprocess.CompletedProcess:
    """Run CHILD with ``passed`` on fd 3, LISTEN_FDS=1 and LISTEN_PID=pid, as systemd does.

    A trampoline puts the socket on fd 3 and execs CHILD, which keeps the trampoline's
    PID: an empty ``pid`` names the child itself.
    """
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    fd = passed.fileno()
    return subprocess.run(
        [sys.executable, "-c", TRAMPOLINE, str(fd), pid, str(script)],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_child_serves_the_socket_on_fd_3(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        done = run_child(tmp_path, listener)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["fd"] == 3
        assert tuple(report["address"]) == listener.getsockname()
        assert report["blocking"] is False
        assert report["inheritable"] is False
        assert report["left"] == []
        client.settimeout(10)
        assert client.recv(100) == b"served\n"
        client.close()


def test_a_child_with_another_pid_binds_on_its_own(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        done = run_child(tmp_path, listener, pid="1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["none"] is True


def test_a_child_given_a_udp_socket_says_so_in_one_line(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        done = run_child(tmp_path, udp)
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"error": "fd 3 is a SOCK_DGRAM socket, not SOCK_STREAM"}


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
def test_systemd_socket_activate_passes_a_socket_we_serve(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with socket.socket() as probe:  # a free port; the tool needs a number
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tool = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "Listening on" in tool.stderr.readline()
        # The tool execs its child on the first connection; the child then serves it.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(100) == b"served\n"
        out, err = tool.communicate(timeout=30)
    finally:
        tool.kill()
        tool.wait()
    assert tool.returncode == 0, err
    report = json.loads(out)
    assert (report["fd"], tuple(report["address"])) == (3, ("127.0.0.1", port))
    assert report["left"] == []
