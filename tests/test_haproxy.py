"""The whole deployment with a real HAProxy (issue 11): deploy/haproxy.cfg, on loopback
ports, in front of two servers run with --proxy-protocol. ``balance first`` fills the
first server up to its maxconn, then the second takes the rest; each server logs the
clients' own addresses (from the PROXY v2 header), never HAProxy's or its health checks.
When the first server shuts down, its clients hear ``BYE shutdown`` and new clients go
to the second."""

from __future__ import annotations

import csv
import re
import shutil
import signal
import socket
import subprocess

import psutil
import pytest
from test_tls import Client, about, chat_both_ways, leave, pair_up

from support import DEADLINE, ROOT, OutputTail, ServerProc, reap_tree, report, wait_until

pytestmark = pytest.mark.skipif(
    not shutil.which("haproxy"), reason="needs haproxy (make sysdeps installs it)"
)

FIRST_ROOMS = 10  # the first server's --max-rooms: its maxconn is twice that
CLIENTS = 60
CHECK_INTERVAL = "100ms"


def free_port() -> int:
    """A port free now on loopback (HAProxy wants a number in its configuration)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def substitute(text: str, old: str, new: str) -> str:
    """Replace the one occurrence of ``old`` in deploy/haproxy.cfg, or fail saying so."""
    assert text.count(old) == 1, f"deploy/haproxy.cfg no longer has one {old!r}"
    return text.replace(old, new)


def write_config(path, front: int, first: int, second: int, inter: str, rooms: int) -> None:
    """deploy/haproxy.cfg with its ports on loopback, the first server's maxconn for
    ``rooms`` rooms and health checks every ``inter``; everything else as shipped."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = substitute(text, "bind :33016", f"bind 127.0.0.1:{front}")
    text = substitute(
        text,
        "server a 127.0.0.1:33017 maxconn 200",
        f"server a 127.0.0.1:{first} maxconn {2 * rooms}",
    )
    text = substitute(text, "server b 127.0.0.1:33018 maxconn 200", f"server b 127.0.0.1:{second}")
    text = substitute(text, "check inter 5s", f"check inter {inter}")
    stats = path.with_name("haproxy.sock")
    text = substitute(text, "\nglobal\n", f"\nglobal\n    stats socket {stats} mode 600\n")
    for required in ("balance first", "send-proxy-v2", "mode tcp"):
        assert required in text
    path.write_text(text)


class HAProxy:
    """``haproxy -db -f CONFIG`` in its own session, its output drained; reaped by PID."""

    def __init__(self, config, front: int) -> None:
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.out, self.err = OutputTail(self.proc.stdout), OutputTail(self.proc.stderr)
        self.address = ("127.0.0.1", front)
        self.config = config
        wait_until(self.listening, what="haproxy listening")

    def listening(self) -> bool:
        """Process state: a socket of haproxy's listens on the front port."""
        assert self.proc.poll() is None, "haproxy exited: " + self.err.text()
        return any(
            c.status == "LISTEN" and c.laddr.port == self.address[1]
            for c in psutil.Process(self.proc.pid).net_connections("tcp")
        )

    def stat(self, field: str) -> dict[str, str]:
        """One column of ``show stat`` (stats socket) for each server: a for the first,
        b for the second (``check_status``: the last health check; ``scur``: sessions)."""
        with socket.socket(socket.AF_UNIX) as stats:
            stats.settimeout(DEADLINE)
            stats.connect(str(self.config.with_name("haproxy.sock")))
            stats.sendall(b"show stat\n")
            text = b"".join(iter(lambda: stats.recv(65536), b"")).decode()
        rows = list(csv.reader(text.lstrip("# ").splitlines()))
        head = rows[0]
        return {
            row[head.index("svname")]: row[head.index(field)]
            for row in rows[1:]
            if len(row) == len(head) and row[head.index("pxname")] == "forkchat"
        }

    def stop(self) -> None:
        reap_tree(self.proc)


@pytest.fixture
def deploy(tmp_path):
    """Start two --proxy-protocol servers behind HAProxy, health checks every ``inter``:
    returns (haproxy, first, second); all three are reaped after the test."""
    started: list = []

    def deploy(
        inter: str = CHECK_INTERVAL, rooms: int = FIRST_ROOMS
    ) -> tuple[HAProxy, ServerProc, ServerProc]:
        first = ServerProc("--no-color", "--proxy-protocol", "--max-rooms", str(rooms))
        started.append(first)
        second = ServerProc("--no-color", "--proxy-protocol")
        started.append(second)
        config, front = tmp_path / "haproxy.cfg", free_port()
        write_config(config, front, first.port, second.port, inter, rooms)
        proxy = HAProxy(config, front)
        started.insert(0, proxy)
        return proxy, first, second

    yield deploy
    for each in started:  # HAProxy first, so the servers' clients close
        each.stop()


def settled_report(server: ServerProc) -> tuple[int, int, int, int]:
    """The SIGUSR2 report at a moment when no health check is in its handshake (one
    that has connected but not yet sent its header counts as handshaking)."""
    got: list[tuple[int, int, int, int]] = []

    def quiet() -> bool:
        got[:] = [report(server)]
        return got[0][3] == 0

    wait_until(quiet, what="a report without a health check in it")
    return got[0]


def connected(server: ServerProc) -> set[str]:
    """The client addresses in the server's ``client connected`` lines."""
    return {m[1] for m in re.finditer(r"client connected (\S+)$", server.out.text(), re.M)}


def test_sixty_clients_fill_the_first_server_then_the_second(deploy):
    proxy, first, second = deploy()
    clients: list[Client] = []
    for n in range(0, CLIENTS, 2):
        a, b = pair_up(proxy.address, None, a=f"c{n}", b=f"c{n + 1}")
        chat_both_ways(a, b)
        clients += [a, b]
    on_first, on_second = clients[: 2 * FIRST_ROOMS], clients[2 * FIRST_ROOMS :]
    # Health checks have reached both servers (a TCP connect with a PROXY v2 LOCAL header):
    wait_until(lambda: proxy.stat("check_status") == {"a": "L4OK", "b": "L4OK", "BACKEND": ""})

    # Each server logs its clients' own addresses (the PROXY source), and nothing else:
    # no HAProxy address, no health check (they run every 100 ms all along).
    assert connected(first) == {c.here for c in on_first}
    assert connected(second) == {c.here for c in on_second}
    for n, c in enumerate(clients):
        server = first if n < 2 * FIRST_ROOMS else second
        assert re.search(rf"client named c{n} {re.escape(c.here)}$", server.out.text(), re.M)
    assert first.out.count("room .* opened") == FIRST_ROOMS
    assert second.out.count("room .* opened") == (CLIENTS - 2 * FIRST_ROOMS) // 2
    for server in (first, second):
        assert server.out.count("client disconnected") == 0, server.out.text()
    assert settled_report(first) == (2 * FIRST_ROOMS, FIRST_ROOMS, 0, 0)
    assert settled_report(second) == (
        CLIENTS - 2 * FIRST_ROOMS,
        (CLIENTS - 2 * FIRST_ROOMS) // 2,
        0,
        0,
    )

    # The first server shuts down while HAProxy still points at it.
    first.signal(signal.SIGUSR1)
    for c in on_first:
        c.expect("BYE shutdown")
        c.close()
    assert first.wait_exit() == 0
    proxy.err.wait_for(r"Server forkchat/a is DOWN")
    for c in on_second:  # untouched
        assert about(second, c.here)
    newcomers = pair_up(proxy.address, None, a="late1", b="late2")
    chat_both_ways(*newcomers)
    assert {c.here for c in newcomers} <= connected(second)
    assert settled_report(second)[0] == CLIENTS - 2 * FIRST_ROOMS + 2
    for c in [*on_second, *newcomers]:
        c.close()


def test_a_client_arriving_before_the_checks_notice_a_stopped_server_goes_to_the_next(deploy):
    proxy, first, second = deploy(inter="5s")  # as shipped
    alice = Client(proxy.address, "alice")
    alice.expect("WAIT ")
    assert about(first, alice.here)
    first.signal(signal.SIGUSR1)
    alice.expect("BYE shutdown")
    alice.close()
    assert first.wait_exit() == 0
    late = Client(proxy.address, "late", hello=False)
    got = late.raw_line()  # option redispatch: the retry goes to the next server
    assert got is not None and got.startswith(b"HELLO "), got
    late.expect("WAIT ")
    assert about(second, late.here)


@pytest.mark.xfail(
    strict=True,
    reason="a limit of the layout, documented in the README: with balance first and a "
    "waiting queue per server, a client left waiting alone on the second server is not "
    "offered to the next arrival once the first server has a free slot again",
)
def test_a_client_waiting_alone_on_the_second_server_gets_the_next_arrival(deploy):
    proxy, first, second = deploy(rooms=1)  # the first server holds one room
    a, b = pair_up(proxy.address, None, a="a", b="b")
    lonely = Client(proxy.address, "lonely")
    lonely.expect("WAIT ")
    assert about(second, lonely.here)
    leave(a, b)  # the first server's room ends: HAProxy frees its two slots
    wait_until(lambda: proxy.stat("scur")["a"] == "0", what="the first server's slots freed")
    newcomer = Client(proxy.address, "newcomer")
    got = newcomer.line()
    lonely_got = lonely.line(timeout=0.5) if got.startswith("PAIRED") else "WAIT still"
    assert (got, lonely_got) == ("PAIRED lonely", "PAIRED newcomer"), about(first, newcomer.here)
