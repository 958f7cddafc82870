"""Upgrade in place (SIGRTMIN): a copy of the checkout serves, is edited into a new
version, and takes over the running server, same PID, rooms still its children, waiting
and handshaking clients carried with what they had sent, nobody refused. Real processes
over real sockets; the new version is told apart by its version and its log."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_proxy import v1
from test_tls import Client, chat_both_ways, leave, pair_up

from forkchat import __version__
from support import (
    DEADLINE,
    ROOT,
    Peer,
    ServerProc,
    SocketActivated,
    child_env,
    close_all,
    pair,
    report,
    wait_until,
)

NEW_VERSION = "9.9.9"
SERVES = r"upgrade: forkchat (\S+) serves now on \S+, pid (\d+) \(was (\S+)\): (.*) carried$"


class Checkout:
    """A copy of the project's code (forkchat/ and bin/) that a test edits into a new
    version while a server runs from it."""

    def __init__(self, where: Path) -> None:
        self.root = where
        ignore = shutil.ignore_patterns("__pycache__")
        for part in ("forkchat", "bin"):
            shutil.copytree(ROOT / part, where / part, ignore=ignore)

    def edit(self, path: str, old: str, new: str) -> None:
        file = self.root / path
        text = file.read_text()
        assert old in text, f"{old!r} not in {path}"
        file.write_text(text.replace(old, new, 1))

    def bump(self, version: str = NEW_VERSION) -> None:
        """The new version: another version number, and rooms that say they are new."""
        self.edit(
            "forkchat/__init__.py", f'__version__ = "{__version__}"', f'__version__ = "{version}"'
        )
        self.edit(
            "forkchat/room.py",
            '"room", f"room {self.number} opened',
            '"room", f"room {self.number} opened (new)',
        )

    def server(self, *args: str, **kw) -> ServerProc:
        return ServerProc(
            "--no-color", *args, launcher=[sys.executable, str(self.root / "bin" / "server")], **kw
        )


@pytest.fixture
def checkout(tmp_path) -> Checkout:
    return Checkout(tmp_path / "checkout")


def upgrade(srv: ServerProc, version: str = NEW_VERSION) -> re.Match:
    """SIGRTMIN, then the new code's line: (version, pid, old version, what it carried)."""
    mark = srv.out.mark()
    srv.signal(signal.SIGRTMIN)
    done = srv.out.wait_for(SERVES, start=mark)
    assert done.group(1) == version and int(done.group(2)) == srv.pid
    return done


def pids_json(port: int) -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "pids"), "--port", str(port), "--json"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def tree(port: int) -> tuple[int, list[tuple[int, int]]]:
    """bin/pids's view: the server's PID, and each room's (number, parent PID)."""
    entries = pids_json(port)
    (server,) = [e for e in entries if e["role"] == "server"]
    return server["pid"], sorted((e["room"], e["ppid"]) for e in entries if e["role"] == "room")


# ---------------------------------------------------------------- what is carried


def test_rooms_waiting_and_handshaking_clients_cross_an_upgrade(checkout):
    """The server's PID, its rooms (still its children, running the old code), a
    waiting client's half-typed line and a handshaking client's half-sent name all
    cross; new rooms run the new code and their numbers go on; SIGUSR2 counts everyone
    once, before and after."""
    srv = checkout.server()
    try:
        alice, bob = pair(srv.address)
        carol = Peer(srv.address, "carol")
        carol.expect("WAIT ")
        carol.send(b"hel")  # half a line, no LF
        henry = Peer(srv.address)
        henry.send(b"hen")  # half a name
        assert report(srv) == (4, 1, 1, 1)
        before = tree(srv.port)
        assert before == (srv.pid, [(1, srv.pid)])
        checkout.bump()
        done = upgrade(srv)
        assert done.group(3) == __version__
        assert done.group(4) == "1 room, 1 waiting, 1 handshaking"
        assert report(srv) == (4, 1, 1, 1)
        # The old room chats on, in the old code.
        alice.send("still here?")
        bob.expect("MSG still here?", "TURN WRITE")
        # The waiting client is paired in a new room, of the new code, numbered on.
        dave = Peer(srv.address, "dave")
        dave.expect("PAIRED carol", "TURN READ")
        carol.expect("PAIRED dave", "TURN WRITE")
        srv.out.wait_for(r"\[room 2 pid \d+\] room 2 opened \(new\) pid")
        carol.send(b"lo dave\n")  # the line begun before the upgrade, finished after
        dave.expect("MSG hello dave", "TURN WRITE")
        henry.send(b"ry\n")
        henry.expect("WAIT ")
        srv.out.wait_for(r"client named henry ")
        assert tree(srv.port) == (srv.pid, [(1, srv.pid), (2, srv.pid)])
        assert report(srv) == (5, 2, 1, 0)
        assert srv.out.count(r"room 1 opened") == 1
        # The old room hands a client back: the new code takes it into its queue.
        bob.send("next")
        bob.expect("WAIT ")
        alice.expect("TURN READ", "BYE partner-exit")
        srv.out.wait_for(r"\[server\] client requeued bob \S+ \(said next\)")
        bob.expect("PAIRED henry", "TURN READ")  # henry waited first
        close_all((alice, bob, carol, dave, henry))
    finally:
        srv.stop()


def test_a_connection_made_during_the_upgrade_is_served(checkout):
    """The listening socket is never closed: clients that connect while the new code
    is checked and while the server re-executes are all greeted, none refused."""
    srv = checkout.server()
    try:
        checkout.bump()
        mark = srv.out.mark()
        srv.signal(signal.SIGRTMIN)
        peers = []
        while not srv.out.count(SERVES) or len(peers) < 4:
            peers.append(Peer(srv.address))  # HELLO read: greeted, by the old code or the new
            if len(peers) > 400:
                break
        srv.out.wait_for(SERVES, start=mark)
        assert len(peers) >= 4
        for i, peer in enumerate(peers):
            peer.send(f"p{i}")
        waiting = sum(1 for p in peers if p.line().startswith(("WAIT ", "PAIRED ")))
        assert waiting == len(peers)
        close_all(peers)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("breakage", "why"),
    [
        (
            ("forkchat/lobby.py", "from .waitlist import", "from .no_such_module import"),
            r"failed its check \(exited with status 1\): ModuleNotFoundError: .*no_such_module",
        ),
        (
            ("forkchat/cli.py", '"--max-rooms", int, 1, 100_000', '"--max-rooms", int, 1, 200'),
            r"failed its check \(exited with status 2\): the options are refused: "
            r"--max-rooms must be between 1 and 200, not '300'",
        ),
    ],
    ids=["no-import", "options-refused"],
)
def test_a_new_code_that_fails_its_check_is_refused_and_the_server_serves_on(
    checkout, breakage, why
):
    srv = checkout.server("--max-rooms", "300")
    try:
        alice, bob = pair(srv.address)
        checkout.edit(*breakage)
        mark = srv.out.mark()
        srv.signal(signal.SIGRTMIN)
        refused = srv.out.wait_for(r"upgrade refused: (.*)$", start=mark)
        assert re.search(why, refused.group(1)), refused.group(1)
        assert refused.group(1).endswith(f"forkchat {__version__} serves on")
        assert srv.out.count("upgrade refused") == 1 and not srv.out.count(SERVES)
        alice.send("after the refusal")
        bob.expect("MSG after the refusal")
        carol, dave = pair(srv.address, "carol", "dave")
        assert tree(srv.port) == (srv.pid, [(1, srv.pid), (2, srv.pid)])
        assert report(srv) == (4, 2, 0, 0)
        close_all((alice, bob, carol, dave))
    finally:
        srv.stop()


# ---------------------------------------------------------------- TLS, PROXY, systemd


def test_over_tls_rooms_go_on_and_clients_not_in_a_room_are_told_to_reconnect(checkout, tls_pair):
    """A TLS session lives in the server's memory: a room keeps its own across the
    upgrade and chats on; a waiting client gets ``BYE shutdown`` saying to reconnect, a
    handshake in progress is closed; new TLS clients are served by the new code."""
    trust = ssl.create_default_context(cafile=tls_pair[0])
    srv = checkout.server("--tls-cert", tls_pair[0], "--tls-key", tls_pair[1])
    try:
        alice, bob = pair_up(srv.address, trust)
        carol = Client(srv.address, "carol", context=trust)
        carol.expect("WAIT ")
        raw = socket.create_connection(srv.address, timeout=DEADLINE)  # no handshake yet
        checkout.bump()
        done = upgrade(srv)
        assert done.group(4) == "1 room, 0 waiting, 1 handshaking"
        carol.expect("BYE shutdown the server is being upgraded: reconnect")
        srv.out.wait_for(r"client disconnected carol \S+ \(server upgrade: a TLS session")
        chat_both_ways(alice, bob)  # the room, and its TLS sessions, go on
        dave, erin = pair_up(srv.address, trust, "dave", "erin")
        srv.out.wait_for(r"room 2 opened \(new\) pid")
        chat_both_ways(dave, erin)
        assert report(srv) == (5, 2, 0, 1)  # raw still handshaking, carried as it was
        raw.close()
        leave(alice, bob)
        leave(dave, erin)
        carol.close()
    finally:
        srv.stop()


def test_with_proxy_protocol_a_half_read_header_and_the_clients_addresses_cross(checkout):
    """Behind a proxy: a handshaking connection whose PROXY header is half read is
    finished by the new code from where the old one stopped; a waiting client keeps the
    address its header gave."""
    srv = checkout.server("--proxy-protocol")
    try:
        carol = Client(srv.address, "carol", header=v1("203.0.113.7", 4107))
        carol.expect("WAIT ")
        header = v1("198.51.100.9", 5109)
        half = socket.create_connection(srv.address, timeout=DEADLINE)
        half.sendall(header[:12])
        srv.out.wait_for(r"client named carol 203\.0\.113\.7:4107")
        checkout.bump()
        done = upgrade(srv)
        assert done.group(4) == "0 rooms, 1 waiting, 1 handshaking"
        half.sendall(header[12:] + b"dave\n")
        dave = Peer.__new__(Peer)
        dave.address, dave.sock, dave.buf = srv.address, half, b""
        dave.expect("HELLO ", "PAIRED carol", "TURN READ")
        carol.expect("PAIRED dave", "TURN WRITE")
        srv.out.wait_for(
            r"room 1 opened \(new\) pid \d+: carol 203\.0\.113\.7:4107 \+ dave 198\.51\.100\.9:5109"
        )
        close_all((carol, dave))
    finally:
        srv.stop()


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate here"
)
def test_under_socket_activation_the_same_socket_and_pid_serve_after_the_upgrade(checkout):
    with SocketActivated(checkout.root / "bin" / "server") as tool:
        alice, bob = pair(tool.address)  # the first connection starts the server
        tool.out.wait_for(rf"forkchat server listening on \S+:{tool.port} pid {tool.pid}$")
        checkout.bump()
        mark = len(tool.out.lines)
        os.kill(tool.pid, signal.SIGRTMIN)
        done = tool.out.wait_for(SERVES, start=mark)
        assert (done.group(1), int(done.group(2))) == (NEW_VERSION, tool.pid)
        alice.send("across")
        bob.expect("MSG across", "TURN WRITE")
        carol, dave = pair(tool.address, "carol", "dave")
        tool.out.wait_for(r"room 2 opened \(new\) pid")
        assert psutil.Process(tool.pid).name() == "forkchat-server"
        close_all((alice, bob, carol, dave))


# ---------------------------------------------------------------- under load


class Bot:
    """A scripted raw client: it writes numbered lines on its turns, says ``next``
    after every ``per_room`` of them and ``exit`` after ``total``, and checks that what
    its partners send it comes whole and in order."""

    def __init__(self, name: str, per_room: int, total: int) -> None:
        self.name, self.per_room, self.total = name, per_room, total
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.greeted = self.exiting = self.done = self.my_turn = False
        self.waiting = False
        self.partner: str | None = None
        self.sent = self.in_room = 0
        self.got: dict[str, list[int]] = {}  # sender -> the numbers received, in order
        self.to: dict[str, list[int]] = {}  # partner -> the numbers sent to it

    def take(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "HELLO":
            self.greeted = True
            self.sock.sendall(self.name.encode() + b"\n")
        elif word == "WAIT":
            self.waiting, self.partner, self.my_turn = True, None, False
        elif word == "PAIRED":
            self.waiting, self.partner, self.in_room = False, rest, 0
        elif line == "TURN WRITE":
            self.my_turn = True
        elif word == "MSG":
            sender, number = rest.split()
            assert sender == self.partner, (self.name, line)
            self.got.setdefault(sender, []).append(int(number))
        elif word == "BYE":
            assert self.exiting and rest.startswith("exit "), (self.name, line)
            self.done = True
        else:
            assert line == "TURN READ", (self.name, line)

    def act(self, hold: bool) -> None:
        """On its turn: a line, ``next`` or (unless ``hold``) ``exit``."""
        if not self.my_turn or self.exiting:
            return
        if self.sent >= self.total:
            if not hold:
                self.exiting = True
                self.sock.sendall(b"exit\n")
            return
        self.my_turn = False
        if self.in_room >= self.per_room:
            self.sock.sendall(b"next\n")
            return
        self.sock.sendall(f"{self.name} {self.sent}\n".encode())
        self.to.setdefault(self.partner, []).append(self.sent)
        self.sent += 1
        self.in_room += 1


class Load:
    """Bots connecting in waves, chatting through a server: one selector loop in the
    test, with a hold (no exit, no new connection) around each count check."""

    def __init__(self, srv: ServerProc, per_room: int = 2, total: int = 6) -> None:
        self.srv, self.per_room, self.total = srv, per_room, total
        self.sel = selectors.DefaultSelector()
        self.bots: list[Bot] = []
        self.hold = False
        self.finishing = False

    def connect(self, count: int) -> None:
        for _ in range(count):
            bot = Bot(f"b{len(self.bots)}", self.per_room, self.total)
            assert bot.sock.connect_ex(self.srv.address) in (0, 115)  # EINPROGRESS
            self.bots.append(bot)
            self.sel.register(bot.sock, selectors.EVENT_READ, bot)

    def pump(self, timeout: float = 0.05) -> None:
        for key, _ in self.sel.select(timeout):
            bot = key.data
            try:
                data = bot.sock.recv(65536)
            except ConnectionResetError:
                raise AssertionError(f"{bot.name} was reset") from None
            if not data:
                assert bot.done, f"{bot.name} closed by the server without a BYE"
                self.sel.unregister(bot.sock)
                bot.sock.close()
                continue
            bot.buf += data
            while b"\n" in bot.buf:
                line, _, bot.buf = bot.buf.partition(b"\n")
                bot.take(line.decode())
        for bot in self.bots:
            if not bot.done:
                bot.act(self.hold)
                if self.finishing and bot.waiting and not bot.exiting:
                    bot.exiting = True  # nobody left to meet: leave from the queue
                    bot.sock.sendall(b"exit\n")

    def until(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what} not reached"
            self.pump()

    def connected(self) -> int:
        """Bots the server counts: greeted, and not yet told BYE."""
        return sum(1 for bot in self.bots if bot.greeted and not bot.done)

    def quiet(self) -> bool:
        """Nothing in flight that changes the count: every bot greeted, every exit
        answered."""
        return all(bot.greeted and (bot.done or not bot.exiting) for bot in self.bots)

    def report(self, mark: int) -> int:
        found = self.srv.out.count
        self.until(lambda: found(r"^rooms \d+, waiting") > mark, "a SIGUSR2 report")
        reports = re.findall(r"NUMBER OF CLIENTS : \*\* (\d+) \*\*", self.srv.out.text())
        return int(reports[-1])

    def check_count_across_an_upgrade(self, version: str) -> None:
        """Hold; once quiet, SIGUSR2 before, with and after the upgrade: exact each time."""
        self.hold = True
        self.until(self.quiet, "quiet")
        expected = self.connected()
        reports = self.srv.out.count(r"^rooms \d+, waiting")
        self.srv.signal(signal.SIGUSR2)
        assert self.report(reports) == expected
        serves = self.srv.out.count(SERVES)
        self.srv.signal(signal.SIGRTMIN)
        self.srv.signal(signal.SIGUSR2)  # blocked across the exec, if it comes then
        assert self.report(reports + 1) == expected
        self.until(lambda: self.srv.out.count(SERVES) > serves, "the new code serving")
        self.srv.signal(signal.SIGUSR2)
        assert self.report(reports + 2) == expected
        assert re.findall(SERVES, self.srv.out.text(), re.M)[-1][0] == version
        self.hold = False

    def finish(self) -> None:
        self.finishing = True
        self.until(lambda: all(bot.done for bot in self.bots), "every bot gone")

    def check_delivery(self) -> None:
        """Every line a bot sent reached the partner it was sent to, in order."""
        by_name = {bot.name: bot for bot in self.bots}
        for bot in self.bots:
            for partner, numbers in bot.to.items():
                got = by_name[partner].got.get(bot.name, [])
                assert got == numbers, (bot.name, partner, numbers, got)


def fd_list(pid: int) -> list[str]:
    out = []
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{name}->{os.readlink(f'/proc/{pid}/fd/{name}')}")
        except OSError:
            pass
    return out


def server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_five_upgrades_under_load_lose_nothing(checkout):
    """Two hundred clients connecting in waves, chatting, saying ``next`` and leaving
    (``--requeue``: a client left behind waits for the next), through five upgrades:
    every line delivered in order, nobody refused or reset, every SIGUSR2 report exact,
    and in the end no room, no fd beyond the server's own."""
    srv = checkout.server("--requeue", "--max-waiting", "500")
    load = Load(srv)
    try:
        warm_up = pair(srv.address, "w1", "w2")  # the server's counts arena exists now
        warm_up[0].send("exit")
        warm_up[1].expect("WAIT ")
        warm_up[1].send("exit")
        close_all(warm_up)
        wait_until(lambda: not srv.children(), what="warm-up room gone")
        base_fds = server_fds(srv.pid)
        for wave in range(5):
            load.connect(40)
            goal = 60 * (wave + 1)
            load.until(lambda goal=goal: sum(b.sent for b in load.bots) > goal, "traffic")
            if wave == 0:
                checkout.bump("9.9.0")
            else:
                checkout.edit("forkchat/__init__.py", f'"9.9.{wave - 1}"', f'"9.9.{wave}"')
            load.check_count_across_an_upgrade(f"9.9.{wave}")
        load.finish()
        load.check_delivery()
        assert sum(b.sent for b in load.bots) == 200 * load.total - sum(
            load.total - b.sent for b in load.bots
        )
        wait_until(lambda: not srv.children(), what="every room reaped")
        assert report(srv) == (0, 0, 0, 0)
        assert srv.out.count(r"room 1 opened") == 1  # numbers went on through the upgrades
        try:
            wait_until(lambda: server_fds(srv.pid) == base_fds, what="the server's fds back")
        except AssertionError:
            raise AssertionError((base_fds, fd_list(srv.pid))) from None
        assert "Traceback" not in srv.out.text() + srv.err.text()
    finally:
        srv.stop()


def test_ten_upgrades_in_a_row_leave_no_fd_process_or_growth(checkout):
    """Ten upgrades one after the other, with rooms chatting through them: the same
    rooms, no zombie, the server's fds and memory where they were after the first."""
    srv = checkout.server()
    try:
        rooms = [pair(srv.address, f"a{i}", f"b{i}") for i in range(3)]
        upgrade(srv, __version__)
        fds, rss = server_fds(srv.pid), psutil.Process(srv.pid).memory_info().rss
        workers = sorted(p.pid for p in srv.children())
        for i in range(10):
            upgrade(srv, __version__)
            for a, b in rooms:
                a.send(f"upgrade {i}")
                a.expect("TURN READ")
                b.expect(f"MSG upgrade {i}", "TURN WRITE")
                b.send(f"ok {i}")
                b.expect("TURN READ")
                a.expect(f"MSG ok {i}", "TURN WRITE")
            assert report(srv) == (6, 3, 0, 0)
        assert sorted(p.pid for p in srv.children()) == workers
        assert all(p.status() != psutil.STATUS_ZOMBIE for p in srv.children())
        assert server_fds(srv.pid) == fds
        assert psutil.Process(srv.pid).memory_info().rss < rss * 1.2
        close_all(p for room in rooms for p in room)
    finally:
        srv.stop()


def test_bin_pids_shows_the_same_server_and_its_rooms_across_an_upgrade(checkout):
    srv = checkout.server()
    try:
        alice, bob = pair(srv.address)
        assert tree(srv.port) == (srv.pid, [(1, srv.pid)])
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bin" / "pids"),
                "--port",
                str(srv.port),
                "--signal",
                "RTMIN",
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            env=child_env(),
        )
        assert done.returncode == 0 and done.stdout.startswith("sent SIGRTMIN to server pid")
        srv.out.wait_for(SERVES)
        assert tree(srv.port) == (srv.pid, [(1, srv.pid)])
        carol, dave = pair(srv.address, "carol", "dave")
        assert tree(srv.port) == (srv.pid, [(1, srv.pid), (2, srv.pid)])
        close_all((alice, bob, carol, dave))
    finally:
        srv.stop()


def test_an_upgrade_whose_tls_files_no_longer_load_is_refused(checkout, tls_pair, tmp_path):
    """The new code would load the certificate and key again: files replaced by bad
    ones since the start make the check fail, and the server serves on with its own."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(tls_pair[0], cert)
    shutil.copy(tls_pair[1], key)
    srv = checkout.server("--tls-cert", str(cert), "--tls-key", str(key))
    try:
        key.write_text("not a key\n")
        mark = srv.out.mark()
        srv.signal(signal.SIGRTMIN)
        refused = srv.out.wait_for(r"upgrade refused: (.*)$", start=mark)
        assert "the TLS files are refused" in refused.group(1), refused.group(1)
        trust = ssl.create_default_context(cafile=tls_pair[0])
        alice, bob = pair_up(srv.address, trust)
        chat_both_ways(alice, bob)
        leave(alice, bob)
    finally:
        srv.stop()
