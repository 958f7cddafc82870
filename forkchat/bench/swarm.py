"""Many synthetic clients in one driver process: a selectors loop over non-blocking
sockets, driven step by step by the bench's commands (``swarm_job``)."""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from typing import Any

from .drivers import PROGRESS_EVERY, RECV_SIZE, await_command


class Client:
    """One synthetic client of a Swarm: its socket, where it is, what it sent and got."""

    __slots__ = (
        "connected_ns",
        "done",
        "first",
        "may_write",
        "name",
        "open",
        "partner",
        "quota_in",
        "quota_out",
        "received",
        "sent",
        "sock",
        "tail",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.sock: socket.socket | None = None
        self.tail = b""
        self.connected_ns = 0
        self.partner = b""
        self.first: bool | None = None
        self.may_write = False
        self.sent = self.received = self.quota_out = self.quota_in = 0
        self.done = False
        self.open = False


class Swarm:
    """Many non-blocking clients of one driver in one selector loop.

    ``connect(n)`` adds n clients at once; each sends its name on HELLO and waits for
    PAIRED and its first TURN (partners may belong to another driver). ``exchange(n)``
    has every open room trade ``n`` more lines, turn by turn. Each line is
    ``<sender> <n>`` and the reader checks it came from its partner, in order.
    ``leave`` sends ``exit`` and waits for the server to close each connection.
    """

    def __init__(self, address: tuple, index: int, timeout: float) -> None:
        self.address = address
        self.index = index
        self.clients: list[Client] = []
        self.timeout = timeout
        self.sel = selectors.DefaultSelector()
        self.exchanging = self.closing = False
        self.paired = self.refused = self.failed = self.finished = self.delivered = 0
        self.wrong = self.exchangers = self.failed_before = 0
        self.latencies: list[int] = []
        self.errors: list[str] = []
        self.first_ns = self.last_paired_ns = self.start_ns = self.end_ns = 0
        self.cpu_start = 0.0  # this process's CPU time when the current step began

    # -- steps --------------------------------------------------------------------------

    def connect(self, count: int) -> None:
        """Start ``count`` more connections at once (non-blocking connect)."""
        self.latencies = []
        self.first_ns = self.last_paired_ns = time.perf_counter_ns()
        self.cpu_start = time.process_time()
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        for _ in range(count):
            client = Client(b"d%dc%d" % (self.index, len(self.clients)))
            self.clients.append(client)
            sock = socket.socket(family)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.connected_ns = time.perf_counter_ns()
            code = sock.connect_ex(self.address)
            client.sock, client.open = sock, True
            if code not in (0, errno.EINPROGRESS):
                self.fail(client, f"connect: {os.strerror(code)}")
                continue
            self.sel.register(sock, selectors.EVENT_READ, client)

    def exchange(self, count: int) -> None:
        """Every open room trades ``count`` more messages; whoever holds the turn starts."""
        self.exchanging = True
        self.finished = self.delivered = 0
        self.failed_before = self.failed
        self.start_ns = self.end_ns = time.perf_counter_ns()
        self.cpu_start = time.process_time()
        open_clients = [client for client in self.clients if client.open]
        self.exchangers = len(open_clients)
        for client in open_clients:
            self.add_quota(client, count)
        for client in open_clients:
            if client.may_write:
                self.write_next(client)

    def add_quota(self, client: Client, count: int) -> None:
        """Give ``client`` its share of ``count`` messages: the side that writes next
        (the first writer after an even number of messages) sends the odd ones."""
        writes_next = client.first == ((client.sent + client.received) % 2 == 0)
        mine, theirs = (count + 1) // 2, count // 2
        client.quota_out += mine if writes_next else theirs
        client.quota_in += theirs if writes_next else mine
        client.done = False

    def leave(self) -> None:
        """Every open client sends ``exit``; the server closes each connection."""
        self.closing = True
        for client in self.clients:
            if client.open:
                self.send(client, b"exit\n")

    def progress(self, step: str) -> tuple[int, int]:
        """(done, total) of ``step``: pairing, messages or leaving."""
        if step == "pairing":
            return self.paired + self.refused + self.failed, len(self.clients)
        if step == "messages":
            return self.finished + self.failed - self.failed_before, self.exchangers
        return sum(1 for client in self.clients if not client.open), len(self.clients)

    def run(self, step: str, link: Any) -> None:
        """Serve events until every client is done with ``step``. Raises TimeoutError."""
        deadline = time.monotonic() + self.timeout
        next_report = 0.0
        while (count := self.progress(step))[0] < count[1]:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"{step}: {count[0]} of {count[1]} clients done in {self.timeout:g} s"
                )
            if now >= next_report:
                link.send(("progress", (step, *count)))
                next_report = now + PROGRESS_EVERY
            for key, _mask in self.sel.select(min(PROGRESS_EVERY, deadline - now)):
                self.read(key.data)

    # -- events -------------------------------------------------------------------------

    def read(self, client: Client) -> None:
        """Read what arrived for ``client`` and handle each complete line."""
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(client, f"connection lost: {exc.strerror or exc}")
            return
        if not data:
            self.on_end(client)
            return
        *lines, client.tail = (client.tail + data).split(b"\n")
        for line in lines:
            self.on_line(client, line)

    def on_line(self, client: Client, line: bytes) -> None:
        """React to one server line, as a client would."""
        if line.startswith(b"MSG "):
            self.on_message(client, line[4:])
        elif line == b"TURN WRITE":
            self.on_turn(client, write=True)
        elif line == b"TURN READ":
            self.on_turn(client, write=False)
        elif line.startswith(b"HELLO "):
            self.send(client, client.name + b"\n")
        elif line.startswith(b"PAIRED "):
            self.on_paired(client, line[7:])
        elif line.startswith(b"BYE "):
            self.on_bye(client, line)
        elif not line.startswith(b"WAIT "):
            self.note(f"{client.name.decode()} got {line[:80]!r}")

    def on_paired(self, client: Client, partner: bytes) -> None:
        now = time.perf_counter_ns()
        client.partner = partner
        self.latencies.append(now - client.connected_ns)
        self.last_paired_ns = max(self.last_paired_ns, now)

    def on_turn(self, client: Client, write: bool) -> None:
        """The first TURN completes the pairing and says who writes first."""
        if client.first is None:
            client.first = write
            self.paired += 1
        client.may_write = write
        if write and self.exchanging:
            self.write_next(client)

    def on_message(self, client: Client, text: bytes) -> None:
        if text != client.partner + b" %d" % client.received:
            self.wrong += 1
            self.note(f"{client.name.decode()} got MSG {text[:80]!r}")
        client.received += 1
        self.delivered += 1
        self.check_done(client)

    def on_bye(self, client: Client, line: bytes) -> None:
        """A BYE before leaving is a refusal (``full``) or a failure."""
        if self.closing:
            return
        if line.startswith(b"BYE full"):
            self.refused += 1
            self.close(client)
        else:
            self.fail(client, f"got {line[:80]!r}")

    def on_end(self, client: Client) -> None:
        if self.closing:
            self.close(client)
        elif client.open:
            self.fail(client, "the server closed the connection")

    # -- actions ------------------------------------------------------------------------

    def write_next(self, client: Client) -> None:
        """Send the client's next message if it has any left."""
        if client.sent < client.quota_out:
            client.may_write = False
            self.send(client, client.name + b" %d\n" % client.sent)
            client.sent += 1
        self.check_done(client)

    def check_done(self, client: Client) -> None:
        """Count the client as finished once it sent and received its share."""
        if client.done or client.first is None:
            return
        if client.sent == client.quota_out and client.received == client.quota_in:
            client.done = True
            self.finished += 1
            self.end_ns = time.perf_counter_ns()

    def send(self, client: Client, data: bytes) -> None:
        """Send a short line at once; lines are small and turns keep buffers nearly empty."""
        try:
            sent = client.sock.send(data)
        except OSError as exc:
            if not self.closing:
                self.fail(client, f"send failed: {exc.strerror or exc}")
            return
        if sent != len(data):
            self.fail(client, "send buffer full")

    def fail(self, client: Client, why: str) -> None:
        if client.open:
            self.failed += 1
            self.note(f"{client.name.decode()}: {why}")
            self.close(client)

    def close(self, client: Client) -> None:
        if client.open:
            client.open = False
            try:
                self.sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.sock.close()

    def note(self, text: str) -> None:
        """Keep the first few error descriptions for the report."""
        if len(self.errors) < 5:
            self.errors.append(text)

    def close_all(self) -> None:
        for client in self.clients:
            self.close(client)
        self.sel.close()


def swarm_job(link: Any, index: int, address: tuple, timeout: float) -> dict:
    """Serve the bench's commands until ``leave``: ``("connect", n)`` adds n clients and
    reports ``paired``; ``("exchange", n)`` has every open room trade n messages and
    reports ``exchanged``; ``("leave",)`` says exit everywhere and ends the job."""
    swarm = Swarm(address, index, timeout)
    try:
        while True:
            command, *args = await_command(link, timeout)
            if command == "connect":
                swarm.connect(args[0])
                swarm.run("pairing", link)
                link.send(("paired", pairing_report(swarm)))
            elif command == "exchange":
                swarm.exchange(args[0])
                swarm.run("messages", link)
                link.send(("exchanged", exchange_report(swarm)))
            elif command == "leave":
                swarm.leave()
                swarm.run("leaving", link)
                return {"errors": swarm.errors}
            else:
                raise RuntimeError(f"unknown command {command!r}")
    finally:
        swarm.close_all()


def pairing_report(swarm: Swarm) -> dict:
    """The last connect step: who paired, each new client's connect -> PAIRED."""
    return {
        "clients": len(swarm.clients),
        "paired": swarm.paired,
        "refused": swarm.refused,
        "failed": swarm.failed,
        "latencies_ns": swarm.latencies,
        "first_ns": swarm.first_ns,
        "last_paired_ns": swarm.last_paired_ns,
        "cpu_seconds": time.process_time() - swarm.cpu_start,
        "errors": list(swarm.errors),
    }


def exchange_report(swarm: Swarm) -> dict:
    """The last exchange step: messages delivered (and wrong), its start and end."""
    return {
        "delivered": swarm.delivered,
        "wrong": swarm.wrong,
        "failed": swarm.failed,
        "start_ns": swarm.start_ns,
        "end_ns": swarm.end_ns,
        "cpu_seconds": time.process_time() - swarm.cpu_start,
        "errors": list(swarm.errors),
    }
