"""bin/pids, the pure parts: choosing the server, parsing, names, matching, output, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import namedtuple

import psutil
import pytest

from forkchat import pids, pidsfind
from forkchat.pidsfind import Entry
from support import BIN, child_env

Addr = namedtuple("Addr", "ip port")
Conn = namedtuple("Conn", "fd family type laddr raddr status pid")


def tcp(laddr: tuple, raddr: tuple | None, status: str, pid: int | None) -> Conn:
    """A fake psutil.net_connections() entry."""
    remote = Addr(*raddr) if raddr else ()
    return Conn(-1, socket.AF_INET, socket.SOCK_STREAM, Addr(*laddr), remote, status, pid)


def free_port() -> int:
    """A port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- choosing the server -------------------------------------------------------------------


S, X = True, False  # named forkchat-server, or not


@pytest.mark.parametrize(
    ("holders", "servers", "strangers"),
    [
        ({100: (1, S)}, [100], []),  # one server
        ({100: (1, S), 200: (100, S)}, [100], []),  # a fresh room still holds the listener
        ({200: (100, S), 100: (1, S)}, [100], []),  # whichever order psutil found them in
        ({100: (1, S), 200: (100, X)}, [100], []),  # a room that took its title
        ({100: (1, S), 200: (100, S), 300: (200, S)}, [100], []),  # a grandchild too
        ({100: (1, S), 500: (2, S)}, [100, 500], []),  # two servers (e.g. IPv4 and IPv6)
        ({1: (0, X), 100: (1, S)}, [100], []),  # socket activation: the manager's copy
        ({1: (0, X), 100: (1, S), 200: (100, S)}, [100], []),  # ... and a fresh room
        ({50: (1, X), 60: (50, X), 100: (60, S)}, [100], []),  # a manager's manager
        ({100: (1, S), 300: (2, X)}, [100], [300]),  # another program on the port
        ({300: (2, X), 301: (300, X)}, [], [300]),  # another program and its child
        ({300: (2, X)}, [], [300]),
        ({}, [], []),
    ],
)
def test_pick_servers_takes_forkchat_listeners_whose_parent_is_none(holders, servers, strangers):
    assert pidsfind.pick_servers(holders) == (servers, strangers)


def test_find_servers_reports_a_listener_hidden_by_access_denied():
    conns = [tcp(("127.0.0.1", 4000), None, psutil.CONN_LISTEN, None)]
    with pytest.raises(pidsfind.LookupFailed, match=r"cannot see \(access denied\)"):
        pidsfind.find_servers(conns, 4000)


def test_find_servers_without_a_listener_says_so():
    conns = [tcp(("127.0.0.1", 4001), None, psutil.CONN_LISTEN, os.getpid())]
    with pytest.raises(pidsfind.LookupFailed, match="no server listening on port 4000"):
        pidsfind.find_servers(conns, 4000)


# -- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["USR2", "SIGUSR2", "12", "usr2", " sigusr2 "])
def test_parse_signal_accepts_name_prefixed_name_and_number(text):
    assert pids.parse_signal(text) == signal.SIGUSR2


@pytest.mark.parametrize("text", ["RTMIN", "SIGRTMIN", "rtmin", str(int(signal.SIGRTMIN))])
def test_parse_signal_takes_the_upgrade_trigger(text):
    assert pids.parse_signal(text) == signal.SIGRTMIN


@pytest.mark.parametrize("text", ["FOO", "SIGFOO", "0", "999", "-12", ""])
def test_parse_signal_refuses_unknown(text):
    with pytest.raises(pids.UsageError, match="unknown signal"):
        pids.parse_signal(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "abc"], "--port must be a number, not 'abc'"),
        (["--port", "0"], "--port must be between 1 and 65535"),
        (["--port", "65536"], "--port must be between 1 and 65535"),
        (["--signal", "FOO"], "unknown signal 'FOO'"),
        (["--all"], "--all goes with --signal"),
        (["--bogus"], "unexpected argument --bogus"),
        (["extra"], "unexpected argument extra"),
        (["--port"], "--port requires argument"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(argv, message, capsys):
    assert pids.main(argv) == pids.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("forkchat pids: ")


def test_options_are_converted():
    opts = pids.parse_options(["--port", "4000", "--json", "--signal", "TERM", "--all"])
    assert opts == pids.Options(4000, True, signal.SIGTERM, True)
    assert pids.parse_options([]) == pids.Options(33016, False, None, False)


@pytest.mark.parametrize(("flag", "text"), [("-h", "Usage:"), ("--version", "forkchat 1.")])
def test_help_and_version_exit_0(flag, text):
    done = subprocess.run(
        [sys.executable, str(BIN / "pids"), flag],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=10,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    assert text in done.stdout and done.stderr == ""


def test_no_server_is_one_line_and_exit_1(capsys):
    port = free_port()
    assert pids.main(["--port", str(port)]) == pids.EXIT_FAILURE
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"forkchat pids: no server listening on port {port} (start one with make run PORT={port})\n"
    )


def test_listener_of_an_invisible_process_is_reported_as_such(monkeypatch, capsys):
    hidden = [tcp(("127.0.0.1", 4000), None, psutil.CONN_LISTEN, None)]
    monkeypatch.setattr(psutil, "net_connections", lambda kind: hidden)
    assert pids.main(["--port", "4000"]) == pids.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "access denied" in err and err.count("\n") == 1


def test_socket_list_refused_by_the_os_is_reported_as_such(monkeypatch, capsys):
    def refuse(kind):
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "net_connections", refuse)
    assert pids.main(["--port", "4000"]) == pids.EXIT_FAILURE
    assert "access denied; run as root" in capsys.readouterr().err


# -- names and addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "name"),
    [
        (["python", "/src/forkchat/bin/client", "alice"], "alice"),
        (["python", "bin/client", "--port", "33016", "--host", "::1", "bob"], "bob"),
        (["python", "bin/client", "--no-color", "carol", "--port", "1"], "carol"),
        (["python", "bin/client"], "client"),
        (["python", "bin/client", "--port", "33016"], "client"),
        (["python", "bin/client", "--", "-dash-"], "-dash-"),
        (["python", "bin/client", "--cafile", "ca.pem", "frank"], "frank"),
        (["python", "/my dir/bin/client", "gina"], "gina"),  # a path with a space
        (["forkchat-client hank --port 1", "", ""], "hank"),  # a title
        ([".venv/bin/python", ".venv/bin/forkchat-client", "dave"], "dave"),
        (["python3", "-m", "forkchat.client", "erin"], "erin"),
        (["nc", "127.0.0.1", "33016"], None),
        (["openssl", "s_client", "-connect", "127.0.0.1:33016"], None),
        (["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"], None),
        (["python", "-c", "import socket"], None),
        ([], None),
    ],
)
def test_client_name_comes_from_a_forkchat_client_command_line(cmdline, name):
    assert pidsfind.client_name(cmdline) == name


@pytest.mark.parametrize(
    ("ip", "text"),
    [
        ("127.0.0.1", "127.0.0.1:33016"),
        ("::ffff:127.0.0.1", "127.0.0.1:33016"),  # a dual-stack listener's view of IPv4
        ("::1", "[::1]:33016"),
    ],
)
def test_format_addr(ip, text):
    assert pidsfind.format_addr(Addr(ip, 33016)) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-1, "0s"),
        (0.4, "0s"),
        (59, "59s"),
        (60, "1m00s"),
        (187, "3m07s"),
        (3600 * 2 + 300, "2h05m"),
        (86400 * 4 + 3 * 3600 + 59, "4d03h"),
    ],
)
def test_format_age(seconds, text):
    assert pids.format_age(seconds) == text


# -- matching clients to the server and its rooms ----------------------------------------------


def family(port: int, listen_ip: str = "127.0.0.1") -> list[Entry]:
    """A server (pid 10, one waiting client) and a room (pid 11, two clients)."""
    here = f"127.0.0.1:{port}"
    server = Entry(
        "server",
        10,
        1,
        None,
        f"{listen_ip}:{port}",
        ["127.0.0.1:5003"],
        9.0,
        ends=[(here, "127.0.0.1:5003")],
    )
    room = Entry(
        "room",
        11,
        10,
        None,
        here,
        ["127.0.0.1:5001", "127.0.0.1:5002"],
        3.0,
        ends=[(here, "127.0.0.1:5001"), (here, "127.0.0.1:5002")],
    )
    return [server, room]


def test_find_connected_matches_both_ends_and_the_listening_address():
    """One entry per process, whatever its number of connections; one per connection
    whose process is hidden."""
    me, port = os.getpid(), 4000
    srv = ("127.0.0.1", port)
    conns = [
        tcp(("127.0.0.1", 5004), srv, psutil.CONN_ESTABLISHED, me),  # not accepted yet
        tcp(("127.0.0.1", 5001), srv, psutil.CONN_ESTABLISHED, me),  # in the room
        tcp(("127.0.0.1", 5002), srv, psutil.CONN_ESTABLISHED, None),  # in the room, hidden
        tcp(("127.0.0.1", 5003), srv, psutil.CONN_ESTABLISHED, me),  # waiting
        tcp(("127.0.0.1", 5005), srv, psutil.CONN_CLOSE_WAIT, me),  # server side gone
        tcp(("10.0.0.9", 5006), ("10.0.0.7", port), psutil.CONN_ESTABLISHED, me),  # elsewhere
        tcp(srv, ("127.0.0.1", 5001), psutil.CONN_ESTABLISHED, 11),  # the room's own end
    ]
    found = pidsfind.find_connected(conns, family(port), now=0.0)
    got = [(c.role, c.pid, c.name, c.address, c.holder, c.note) for c in found]
    assert got == [
        (
            "other",  # pytest is no forkchat client
            me,
            psutil.Process().name(),
            "127.0.0.1:5001 127.0.0.1:5003 127.0.0.1:5004",  # in address order
            None,  # held by the room, the server and nobody yet: several
            None,
        ),
        ("other", None, None, "127.0.0.1:5002", 11, "access denied"),
    ]
    assert found[0].peers == [f"127.0.0.1:{port}"] * 3 and found[1].peers == [f"127.0.0.1:{port}"]


def test_a_process_whose_connections_one_room_holds_has_that_holder():
    me, port = os.getpid(), 4000
    conns = [
        tcp(("127.0.0.1", 5002), ("127.0.0.1", port), psutil.CONN_ESTABLISHED, me),
        tcp(("127.0.0.1", 5001), ("127.0.0.1", port), psutil.CONN_ESTABLISHED, me),
    ]
    (found,) = pidsfind.find_connected(conns, family(port), now=0.0)
    assert (found.address, found.holder) == ("127.0.0.1:5001 127.0.0.1:5002", 11)


def test_find_connected_of_a_wildcard_listener_needs_the_server_end():
    me, port = os.getpid(), 4000
    conns = [
        tcp(("127.0.0.1", 5001), ("127.0.0.1", port), psutil.CONN_ESTABLISHED, me),
        tcp(("127.0.0.1", 5009), ("127.0.0.1", port), psutil.CONN_ESTABLISHED, me),  # another
    ]
    found = pidsfind.find_connected(conns, family(port, listen_ip="0.0.0.0"), now=0.0)
    assert [(c.address, c.holder) for c in found] == [("127.0.0.1:5001", 11)]


def test_clients_come_before_others_each_in_their_holders_order():
    server, room = family(4000)
    connected = [
        Entry("other", 24, 1, "nc", "127.0.0.1:5004", [], 1.0, holder=11),
        Entry("client", 23, 1, "carol", "127.0.0.1:5003", [], 1.0, holder=10),
        Entry("other", None, None, None, "127.0.0.1:5005", [], None, holder=None),
        Entry("client", 22, 1, "bob", "127.0.0.1:5002", [], 1.0, holder=11),
        Entry("client", 21, 1, "alice", "127.0.0.1:5001", [], 1.0, holder=11),
    ]
    ordered = pidsfind.order_connected(connected, [server, room])
    assert [c.pid for c in ordered] == [21, 22, 23, 24, None]


# -- output ------------------------------------------------------------------------------------


def test_table_has_a_header_and_aligned_columns():
    server, room = family(4000)
    room.room, room.name = 1, "alice+bob"
    hidden = Entry(
        "other", None, None, None, "127.0.0.1:5002", ["127.0.0.1:4000"], None, note="access denied"
    )
    lines = pids.render_table([server, room, hidden]).splitlines()
    assert lines[0].split() == ["ROLE", "PID", "PPID", "NAME", "ADDRESS", "PEER", "AGE"]
    assert lines[1].split() == ["server", "10", "1", "-", "127.0.0.1:4000", "127.0.0.1:5003", "9s"]
    assert lines[2].split()[:4] == ["room", "11", "10", "#1:alice+bob"]
    assert lines[2].split()[4:] == ["127.0.0.1:4000", "127.0.0.1:5001", "127.0.0.1:5002", "3s"]
    assert lines[3].split() == [
        "other",
        "?",
        "?",
        "(access",
        "denied)",
        "127.0.0.1:5002",
        "127.0.0.1:4000",
        "-",
    ]
    starts = {line.index(line.split()[1]) for line in lines}
    assert len(starts) == 1, "the PID column is aligned"


def test_many_peers_are_counted_in_the_table_and_listed_in_json():
    server = Entry(
        "server", 10, 1, None, "127.0.0.1:4000", [f"127.0.0.1:{p}" for p in range(5)], 1.0
    )
    assert "5 clients" in pids.render_table([server])
    proxy = Entry("other", 20, 1, "haproxy", " ".join(server.peers), ["127.0.0.1:4000"] * 3, 1.0)
    assert pids.table_row(proxy)[3:6] == ("haproxy", "5 sockets", "3 peers")
    data = json.loads(pids.render_json([server]))
    assert data[0]["peers"] == server.peers
    assert set(data[0]) >= {"role", "pid", "ppid", "address", "name", "age"}
    assert "proc" not in data[0] and "ends" not in data[0]


# -- signals ---------------------------------------------------------------------------------


class Refusing:
    """A psutil.Process stand-in whose owner is another user."""

    def send_signal(self, sig):
        raise psutil.AccessDenied(pid=1)


def with_signal(sig: signal.Signals, everyone: bool) -> pids.Options:
    return pids.Options(4000, False, sig, everyone)


def test_signal_targets_are_the_server_then_each_forkchat_client():
    server, room = family(4000)
    a = Entry("client", 21, 1, "alice", "127.0.0.1:5001", [], 1.0)
    b = Entry("client", 23, 1, "bob", "127.0.0.1:5003", [], 1.0)
    nc = Entry("other", 24, 1, "nc", "127.0.0.1:5004", [], 1.0)
    hidden = Entry("other", None, None, None, "127.0.0.1:5005", [], None, note="access denied")
    entries = [server, room, a, b, nc, hidden]
    assert pids.signal_targets(entries, with_signal(signal.SIGUSR2, False)) == [server]
    assert pids.signal_targets(entries, with_signal(signal.SIGUSR2, True)) == [server, a, b]
    assert pids.signal_targets(entries, with_signal(signal.SIGRTMIN, True)) == [server]


@pytest.mark.parametrize(
    "name", ["USR2", "USR1", "TERM", "INT", "HUP", "CONT", "WINCH", "TSTP", "CHLD", "URG"]
)
def test_clients_get_the_signals_bin_client_takes(name):
    assert pids.parse_signal(name) in pids.CLIENT_SIGNALS


@pytest.mark.parametrize("name", ["RTMIN", "KILL", "STOP", "QUIT", "ALRM", "TTIN", "SEGV"])
def test_clients_never_get_a_signal_they_would_die_or_stop_of(name):
    assert pids.parse_signal(name) not in pids.CLIENT_SIGNALS


def test_what_all_spares_is_said_in_a_line_each():
    server, _ = family(4000)
    a = Entry("client", 21, 1, "alice", "127.0.0.1:5001", [], 1.0)
    nc = Entry("other", 24, 1, "nc", "127.0.0.1:5004", [], 1.0)
    hidden = Entry("other", None, None, None, "127.0.0.1:5005", [], None, note="access denied")
    entries = [server, a, nc, hidden]
    assert pids.spared_lines(entries, with_signal(signal.SIGRTMIN, True)) == [
        "SIGRTMIN not sent to the client: bin/client does not handle it",
        "SIGRTMIN not sent to the 2 other programs: pid 24 (nc), pid ? (access denied)",
    ]
    assert pids.spared_lines(entries, with_signal(signal.SIGUSR2, True)) == [
        "SIGUSR2 not sent to the 2 other programs: pid 24 (nc), pid ? (access denied)",
    ]
    assert pids.spared_lines(entries, with_signal(signal.SIGRTMIN, False)) == []
    assert pids.spared_lines([server], with_signal(signal.SIGRTMIN, True)) == []


def test_a_process_gone_before_the_signal_is_reported_not_a_crash(capsys):
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
        env=child_env(),
    )
    looked_up = psutil.Process(proc.pid)
    proc.stdin.close()
    proc.wait(10)  # exited and reaped: its PID may even be reused, psutil notices
    server = Entry("server", os.getpid(), 1, None, "127.0.0.1:4000", [], 1.0, proc=psutil.Process())
    gone = Entry("client", proc.pid, 1, None, "127.0.0.1:5001", [], 1.0, proc=looked_up)
    opts = pids.Options(4000, False, signal.SIGCONT, True)  # harmless to the test itself
    assert pids.signal_entries([server, gone], opts) == pids.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sent SIGCONT to server pid {os.getpid()} (127.0.0.1:4000)"
    assert out[1] == f"not sent SIGCONT to client pid {proc.pid} (127.0.0.1:5001): it has exited"


def test_a_server_gone_before_the_signal_is_exit_1(capsys):
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
        env=child_env(),
    )
    looked_up = psutil.Process(proc.pid)
    proc.stdin.close()
    proc.wait(10)
    server = Entry("server", proc.pid, 1, None, "127.0.0.1:4000", [], 1.0, proc=looked_up)
    opts = pids.Options(4000, True, signal.SIGUSR2, False)
    assert pids.signal_entries([server], opts) == pids.EXIT_FAILURE
    report = json.loads(capsys.readouterr().out)
    assert report[0]["pid"] == proc.pid and report[0]["result"] == "gone"


def test_another_users_process_is_reported_as_access_denied(capsys):
    server = Entry("server", 10, 1, None, "127.0.0.1:4000", [], 1.0, proc=Refusing())
    client = Entry("client", 21, 1, "alice", "127.0.0.1:5001", [], 1.0, proc=Refusing())
    opts = pids.Options(4000, False, signal.SIGUSR1, True)
    assert pids.signal_entries([server, client], opts) == pids.EXIT_FAILURE
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "not sent SIGUSR1 to server pid 10 (127.0.0.1:4000): access denied, another user's process",
        "not sent SIGUSR1 to client pid 21 (alice 127.0.0.1:5001): access denied, another user's "
        "process",
    ]


# -- recognising forkchat processes (issue 12, item 3) ---------------------------------------


@pytest.mark.parametrize(
    ("name", "cmdline", "server"),
    [
        ("forkchat-server", ["/venv/bin/python", "bin/server", "--port", "0"], True),  # comm
        ("python3", ["forkchat-server --port 0", "", "", ""], True),  # title, padded
        ("python3", ["forkchat-server", "--port", "0"], True),  # title split on spaces
        ("forkchat-server --port 0", ["forkchat-server --port 0", ""], True),  # psutil name()
        ("x.pid", ["forkchat-server --pidfile /run/x.pid", ""], True),  # basename of a title
        ("python3", ["python3", "-m", "http.server", "33016"], False),
        ("python3", ["python3", "bin/server", "--port", "0"], False),  # no name set
        ("nc", ["nc", "-l", "33016"], False),
        ("forkchat-room", ["forkchat-room 7 alice+bob", ""], False),  # a room is no server
        ("", [], False),  # nothing readable
    ],
)
def test_is_forkchat_server_by_comm_or_title(name, cmdline, server):
    assert pidsfind.is_forkchat_server(name, cmdline) is server


@pytest.mark.parametrize(
    ("cmdline", "title"),
    [
        (["forkchat-room 7 alice+bob", "", "", ""], (7, "alice+bob")),  # setproctitle
        (["forkchat-room", "7", "alice+bob"], (7, "alice+bob")),  # split on spaces
        (["forkchat-room 12 a.b-c_d+?", ""], (12, "a.b-c_d+?")),  # a name not known
        (["forkchat-room 7 alice+bob "], (7, "alice+bob")),
        (["/venv/bin/python", "bin/server", "--port", "0"], None),  # a room not titled yet
        (["forkchat-room 7", ""], None),  # no names
        (["forkchat-room x alice+bob"], None),
        (["forkchat-server --port 0"], None),
        ([], None),
    ],
)
def test_room_title_parses_number_and_names(cmdline, title):
    assert pidsfind.room_title(cmdline) == title


def test_a_titled_room_shows_its_number():
    server, room = family(4000)
    room.room, room.name = 7, "alice+bob"
    assert pids.table_row(room)[3] == "#7:alice+bob"
    assert (room.to_json()["room"], room.to_json()["name"]) == (7, "alice+bob")
    assert pids.table_row(server)[3] == "-"


def test_another_listener_alone_fails_with_its_pid_name_and_address(monkeypatch):
    proc = psutil.Process()
    holder = pidsfind.Holder(proc, proc.ppid(), "python3", False)
    monkeypatch.setattr(pidsfind, "listen_addresses", lambda proc, port: ["127.0.0.2:4000"])
    assert pidsfind.stranger_text(4000, holder, alone=True) == (
        f"port 4000 is held by pid {proc.pid} (python3) on 127.0.0.2:4000, which is not a "
        "forkchat server; not listed, not signalled"
    )
    assert pidsfind.stranger_text(4000, holder, alone=False).startswith(
        f"port 4000 is also held by pid {proc.pid} (python3) on 127.0.0.2:4000, "
    )


def test_addresses_sort_as_numbers_ipv4_first():
    texts = ["[::1]:80", "127.0.0.10:80", "127.0.0.2:443", "127.0.0.2:80", "[::ffff:1]:1"]
    assert sorted(texts, key=pidsfind.addr_key) == [
        "127.0.0.2:80",
        "127.0.0.2:443",
        "127.0.0.10:80",
        "[::1]:80",
        "[::ffff:1]:1",
    ]
