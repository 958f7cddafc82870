"""deploy/: the systemd units parse and verify, and HAProxy accepts and runs haproxy.cfg.

HAProxy comes from Debian's package (make sysdeps installs it); without it those tests
skip. The run test puts plain listeners where the forkchat servers would be, to see what
HAProxy sends them: health checks, PROXY v2 headers, and the "balance first" order.
"""

import configparser
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from forkchat.proxyproto import ProxyHeaderReader
from support import DEADLINE, ServerProc, pair

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALL_ROOT = "/opt/forkchat"

needs_haproxy = pytest.mark.skipif(
    not shutil.which("haproxy"), reason="haproxy is not installed (make sysdeps)"
)


def read_unit(name: str) -> configparser.ConfigParser:
    """Parse a unit file as INI: case kept, no interpolation, empty values allowed."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str
    parser.read_string((DEPLOY / name).read_text())
    return parser


def max_rooms() -> int:
    """The --max-rooms the service runs with: the other sizes derive from it."""
    argv = shlex.split(read_unit("forkchat.service")["Service"]["ExecStart"])
    return int(argv[argv.index("--max-rooms") + 1])


# ---- systemd units -------------------------------------------------------------------


def test_socket_unit_passes_one_stream_socket_on_the_port():
    socket_section = read_unit("forkchat.socket")["Socket"]
    assert socket_section["ListenStream"] == "33016"
    assert socket_section["Accept"] == "no"
    assert socket_section["Service"] == "forkchat.service"
    assert read_unit("forkchat.socket")["Install"]["WantedBy"] == "sockets.target"


def test_service_runs_the_server_from_the_install_path():
    unit = read_unit("forkchat.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[:2] == [f"{INSTALL_ROOT}/.venv/bin/python", f"{INSTALL_ROOT}/bin/server"]
    assert "--no-color" in argv
    assert unit["Unit"]["Requires"] == "forkchat.socket"


def test_service_stops_through_the_servers_own_shutdown():
    service = read_unit("forkchat.service")["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > 5  # the server's own grace for its rooms


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
    ],
)
def test_service_is_hardened(key, value):
    assert read_unit("forkchat.service")["Service"][key] == value


def test_service_limits_follow_max_rooms():
    service = read_unit("forkchat.service")["Service"]
    rooms = max_rooms()
    assert int(service["TasksMax"]) > rooms + 1  # a task per room and the server
    assert int(service["LimitNOFILE"]) > 2 * rooms
    assert re.fullmatch(r"\d+[MG]", service["MemoryMax"])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path):
    # verify checks that ExecStart exists: point the install path at this checkout.
    service = (DEPLOY / "forkchat.service").read_text().replace(INSTALL_ROOT, str(ROOT))
    (tmp_path / "forkchat.service").write_text(service)
    shutil.copy(DEPLOY / "forkchat.socket", tmp_path / "forkchat.socket")
    done = subprocess.run(
        ["systemd-analyze", "verify", "forkchat.socket", "forkchat.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""


# ---- HAProxy -------------------------------------------------------------------------


def server_lines() -> dict[str, str]:
    """The backend's server lines of haproxy.cfg, by server name."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    return dict(re.findall(r"^\s*server (\S+) (.*)$", text, re.MULTILINE))


def test_haproxy_balances_first_with_room_sized_maxconn():
    text = (DEPLOY / "haproxy.cfg").read_text()
    code = re.sub(r"#.*", "", text)  # directives only, not the comments about them
    for directive in ("mode tcp", "balance first", "send-proxy-v2", "check"):
        assert re.search(rf"(^|\s){directive}(\s|$)", code, re.MULTILINE), directive
    servers = server_lines()
    assert len(servers) >= 2
    for line in servers.values():
        assert line.startswith("127.0.0.1:")
        assert f"maxconn {2 * max_rooms()}" in line


@needs_haproxy
def test_haproxy_accepts_the_configuration():
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_config(front: int, backends: list[int], maxconn: int) -> str:
    """deploy/haproxy.cfg moved to test ports, a small maxconn and quick checks."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    text, binds = re.subn(r"^(\s*)bind :33016$", rf"\1bind 127.0.0.1:{front}", text, flags=re.M)
    text, checks = re.subn(r"\binter 5s\b", "inter 100ms", text)
    ports = iter(backends)
    text, servers = re.subn(
        r"^(\s*server \S+) 127\.0\.0\.1:\d+ maxconn \d+",
        lambda match: f"{match[1]} 127.0.0.1:{next(ports)} maxconn {maxconn}",
        text,
        flags=re.M,
    )
    assert (binds, checks, servers) == (1, 1, len(backends))
    return text


def read_header(listener: socket.socket):
    """Accept one connection; return (its PROXY header, the socket)."""
    listener.settimeout(10)
    conn, _ = listener.accept()
    conn.settimeout(10)
    reader = ProxyHeaderReader()
    while (header := reader.feed(conn.recv(4096))) is None:
        pass
    return header, conn


def accept_clients(listener: socket.socket, wanted: int, held: list) -> dict:
    """Accept until ``wanted`` relayed clients came; health checks are skipped (closed).

    Returns {name line: PROXY header} for each client. Client sockets go into ``held``,
    open: closing one would free its slot in HAProxy's maxconn while others still
    arrive, and the next client could then go to this server too.
    """
    clients = {}
    while len(clients) < wanted:
        header, conn = read_header(listener)
        if header.command != "proxy":
            conn.close()
            continue
        held.append(conn)
        line = header.rest
        while not line.endswith(b"\n"):
            line += conn.recv(100)  # the client's name line follows its header
        clients[line] = header
    return clients


@needs_haproxy
def test_haproxy_sends_proxy_v2_fills_the_first_server_and_checks_with_local(tmp_path):
    first = socket.create_server(("127.0.0.1", 0))
    second = socket.create_server(("127.0.0.1", 0))
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    ports = [first.getsockname()[1], second.getsockname()[1]]
    config.write_text(local_config(front, ports, maxconn=2))
    proxy = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    users = {}
    held: list[socket.socket] = []
    try:
        check, conn = read_header(first)  # checks start at once: HAProxy is up
        conn.close()
        assert (check.version, check.command, check.source) == (2, "local", None)
        for number in range(3):
            user = socket.create_connection(("127.0.0.1", front), timeout=10)
            user.sendall(b"user%d\n" % number)
            users[b"user%d\n" % number] = user
        on_first = accept_clients(first, 2, held)
        on_second = accept_clients(second, 1, held)
        # maxconn 2: two fill the first server, the third goes on (which two: HAProxy's
        # threads may take the three connections in either order).
        assert (len(on_first), len(on_second)) == (2, 1)
        assert sorted([*on_first, *on_second]) == sorted(users)
        for name, header in {**on_first, **on_second}.items():
            assert header.command == "proxy"
            assert header.source == users[name].getsockname()
            assert header.dest == ("127.0.0.1", front)
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        for sock in [first, second, *users.values(), *held]:
            sock.close()


def test_systemctl_reload_upgrades_the_server_in_place():
    """ExecReload, run as systemd runs it ($MAINPID the server's PID), makes the server
    re-execute itself under the same PID with its room still open."""
    command = read_unit("forkchat.service")["Service"]["ExecReload"]
    srv = ServerProc("--no-color")
    try:
        alice, bob = pair(srv.address)
        argv = [word.replace("$MAINPID", str(srv.pid)) for word in shlex.split(command)]
        subprocess.run(argv, check=True, timeout=DEADLINE)
        srv.out.wait_for(rf"upgrade: forkchat \S+ serves now on \S+, pid {srv.pid} ")
        alice.send("after the reload")
        bob.expect("MSG after the reload", "TURN WRITE")
        alice.close()
        bob.close()
    finally:
        srv.stop()
