"""The benchmark's yardstick: a minimal fork-per-room relay speaking forkchat's framing.

``bin/bench --ref`` runs this beside forkchat, interleaved rep by rep, and divides
forkchat's figures by its own. The relay does only what the protocol makes every
message cost: one ``recv``, then ``MSG <text>`` + ``TURN WRITE`` to the reader and
``TURN READ`` to the writer with ``sendall``, on ``TCP_NODELAY`` sockets, in a worker
forked per room (multiprocessing's fork context, a ``selectors`` loop). So the ratio is
what forkchat's own work (validation, turns, bounded output, timeouts, the count, the
log) costs on top of the protocol in Python.

It greets with HELLO, takes the first line as the name, and pairs clients in arrival
order with the same PAIRED and TURN lines as forkchat, so the bench's drivers drive
both alike. It is not a server to use: no validation (one ``recv`` is taken to be one
line), no log, no timeouts, no limits, no signal handling. It uses the standard library
only and imports nothing of forkchat, so its workers carry nothing else.

Usage: python forkchat/bench/reference.py [--host HOST] [--port PORT]
Prints ``forkchat reference relay listening on HOST:PORT pid PID`` once it listens.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import selectors
import socket
import time

MP = multiprocessing.get_context("fork")
RECV_SIZE = 65536
LINGER = 2.0  # seconds a closing room waits for its clients to close after BYE
HELLO = b"HELLO forkchat/1 reference relay, send your name\n"
WAIT = b"WAIT waiting for a partner\n"


def relay(first: socket.socket, second: socket.socket, listener: socket.socket) -> None:
    """Body of a room worker: relay each line to the partner with the turn lines, until
    one side leaves (``exit``) or vanishes. ``first`` writes first."""
    listener.close()
    sel = selectors.DefaultSelector()
    sel.register(first, selectors.EVENT_READ, second)
    sel.register(second, selectors.EVENT_READ, first)
    try:
        while True:
            for key, _ in sel.select():
                if not relay_line(key.fileobj, key.data):
                    return
    except OSError:  # a client vanished mid-send: the room is over
        pass
    finally:
        close_room(sel, first, second)


def relay_line(writer: socket.socket, reader: socket.socket) -> bool:
    """Relay what one ``recv`` brought; on ``exit`` or end of stream say BYE and return
    False (the room closes)."""
    data = writer.recv(RECV_SIZE)
    if data == b"exit\n":
        writer.sendall(b"BYE exit goodbye\n")
        reader.sendall(b"BYE partner-exit\n")
        return False
    if not data:
        reader.sendall(b"BYE partner-lost\n")
        return False
    reader.sendall(b"MSG " + data + b"TURN WRITE\n")
    writer.sendall(b"TURN READ\n")
    return True


def close_room(sel: selectors.BaseSelector, *socks: socket.socket) -> None:
    """Send FIN on both, wait (up to LINGER) for each client to close, then close."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sel.unregister(sock)  # already reset: nothing to wait for
    deadline = time.monotonic() + LINGER
    while sel.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            try:
                if key.fileobj.recv(RECV_SIZE):
                    continue
            except OSError:
                pass
            sel.unregister(key.fileobj)
    for sock in socks:
        sock.close()


class Relay:
    """The parent: accepts, greets, reads names, pairs in arrival order, forks rooms."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, self.accept_clients)
        self.names: dict[socket.socket, bytes] = {}  # name bytes read so far
        self.waiting: tuple[socket.socket, bytes] | None = None

    def serve_forever(self) -> None:
        while True:
            for key, _ in self.sel.select():
                key.data(key.fileobj)

    def accept_clients(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(HELLO)
            sock.setblocking(False)
            self.names[sock] = b""
            self.sel.register(sock, selectors.EVENT_READ, self.read_name)

    def read_name(self, sock: socket.socket) -> None:
        data = sock.recv(RECV_SIZE)
        self.names[sock] += data
        if data and b"\n" not in self.names[sock]:
            return
        self.sel.unregister(sock)
        name = self.names.pop(sock).partition(b"\n")[0].strip()
        sock.setblocking(True)
        if not data:
            sock.close()
        elif self.waiting is None:
            sock.sendall(WAIT)
            self.waiting = (sock, name)
        else:
            self.pair(sock, name)

    def pair(self, second: socket.socket, name: bytes) -> None:
        first, first_name = self.waiting
        self.waiting = None
        first.sendall(b"PAIRED " + name + b"\nTURN WRITE\n")
        second.sendall(b"PAIRED " + first_name + b"\nTURN READ\n")
        room = MP.Process(target=relay, args=(first, second, self.listener), daemon=False)
        room.start()
        first.close()
        second.close()
        self.sel.register(room.sentinel, selectors.EVENT_READ, lambda _fd: self.reap(room))

    def reap(self, room: multiprocessing.process.BaseProcess) -> None:
        self.sel.unregister(room.sentinel)
        room.join()
        room.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="forkchat's benchmark reference relay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    listener = socket.create_server((args.host, args.port), backlog=4096)
    listener.setblocking(False)
    host, port = listener.getsockname()[:2]
    print(f"forkchat reference relay listening on {host}:{port} pid {os.getpid()}", flush=True)
    Relay(listener).serve_forever()


if __name__ == "__main__":
    main()
