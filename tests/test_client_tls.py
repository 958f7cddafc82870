"""bin/client --tls / --cafile (issue 11) against a scripted TLS server: a short Python
program started as a process of its own, with certificates made by the openssl CLI.

The scripted server speaks the forkchat server's lines (HELLO, WAIT, PAIRED, TURN, MSG,
BYE) over TLS, so the client is tested before the real server has TLS.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_client import CLIENT

from support import DEADLINE, OutputTail, child_env, reap_tree, run_bin

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

LARGEST = 1 << 20

# argv: CERT KEY MODE. Prints its port, serves one connection, prints what happened.
# MODE "chat": many small records then a turn; "big": a message of the largest line.
TLS_SERVER_CODE = """\
import socket, ssl, sys
cert, key, mode = sys.argv[1:4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.minimum_version = ssl.TLSVersion.TLSv1_2
context.load_cert_chain(cert, key)
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(10)
print(listener.getsockname()[1], flush=True)
raw, _ = listener.accept()
raw.settimeout(10)
try:
    conn = context.wrap_socket(raw, server_side=True)
except (ssl.SSLError, OSError) as exc:
    print("HANDSHAKE-FAILED", exc, flush=True)
    sys.exit(0)
lines = conn.makefile("rb")
conn.sendall(b"HELLO forkchat/1 send your name\\n")
print("NAME", lines.readline().decode().strip(), flush=True)
conn.sendall(b"WAIT waiting for a partner\\n")
conn.sendall(b"PAIRED alice\\n")
conn.sendall(b"TURN READ\\n")
if mode == "big":
    conn.sendall(b"MSG " + b"z" * (1 << 20) + b"\\n")
else:
    for i in range(50):  # one TLS record each
        conn.sendall(b"MSG line %d\\n" % i)
conn.sendall(b"TURN WRITE\\n")
print("GOT", lines.readline().decode().rstrip("\\n"), flush=True)
print("THEN", lines.readline().decode().rstrip("\\n"), flush=True)
conn.sendall(b"TURN READ\\n")
conn.sendall(b"BYE partner-exit alice left the chat\\n")
conn.close()
print("DONE", flush=True)
"""


def make_cert(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made by the openssl CLI."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost", "-addext", san),
        ],
        check=True,
        capture_output=True,
        timeout=DEADLINE * 3,
    )
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """{"good": the server's, "other": an unrelated one, "dns-only": no IP in its SAN}."""
    directory = tmp_path_factory.mktemp("certs")
    return {
        "good": make_cert(directory, "good", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        "other": make_cert(directory, "other", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        "dns-only": make_cert(directory, "dns", "subjectAltName=DNS:other.example"),
    }


class TlsServer:
    """The scripted TLS server process: its port and its report lines."""

    def __init__(self, cert: Path, key: Path, mode: str = "chat") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TLS_SERVER_CODE, str(cert), str(key), mode],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,
        )
        self.out = OutputTail(self.proc.stdout)
        self.port = int(self.out.wait_for(r"^(\d+)$").group(1))


@pytest.fixture
def tls_server():
    """Factory of scripted TLS servers, every one reaped by PID at teardown."""
    started: list[TlsServer] = []

    def start(cert: Path, key: Path, mode: str = "chat") -> TlsServer:
        started.append(TlsServer(cert, key, mode))
        return started[-1]

    yield start
    for server in started:
        reap_tree(server.proc)


def run_client(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run a piped bin/client as bob to its end with a deadline; reap it whatever happens."""
    return run_bin("client", "bob", "--port", str(port), *args, input=stdin.decode())


def test_chat_over_tls_with_cafile(certs, tls_server):
    server = tls_server(*certs["good"])
    done = run_client(server.port, "--cafile", str(certs["good"][0]), stdin=b"hi over tls\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    cafile = certs["good"][0]
    assert lines[:5] == [
        f"connected to 127.0.0.1:{server.port} as bob",
        f"[TLS] TLSv1.3, certificate verified for 127.0.0.1 against {cafile}",
        "[WAIT] waiting for a partner",
        "[PAIRED] you are chatting with alice",
        "[READ] waiting for alice",
    ]
    assert lines[5:55] == [f"alice: line {i}" for i in range(50)]  # 50 records, none lost
    assert lines[55:] == [
        "[WRITE] your turn to write",
        "leaving: end of input",
        "[BYE] alice left the chat (partner-exit)",
    ]
    server.out.wait_for("^NAME bob$")
    server.out.wait_for("^GOT hi over tls$")
    server.out.wait_for("^THEN exit$")  # at once: the input ended
    server.out.wait_for("^DONE$")


def test_largest_message_over_tls(certs, tls_server):
    server = tls_server(*certs["good"], mode="big")
    done = run_client(server.port, "--cafile", str(certs["good"][0]), stdin=b"got it\n")
    assert done.returncode == 0, done.stderr
    assert "alice: " + "z" * LARGEST in done.stdout.splitlines()
    server.out.wait_for("^GOT got it$")


@pytest.mark.parametrize(
    ("server_cert", "args", "reason", "hint"),
    [
        # the wrong CA: the hint names the file that was tried
        ("good", ["--cafile", "other"], "self-signed certificate", "it is not signed by a CA in "),
        # the system's CAs: the hint is --cafile
        ("good", ["--tls"], "self-signed certificate", "use --cafile FILE for a private CA"),
        # the right CA, the wrong name: the hint is --host
        (
            "dns-only",
            ["--cafile", "dns-only"],
            "IP address mismatch",
            "the certificate is for another",
        ),
    ],
)
def test_unverified_certificate_is_one_line_and_exit_1(
    certs, tls_server, server_cert, args, reason, hint
):
    server = tls_server(*certs[server_cert])
    args = [str(certs[a][0]) if a in certs else a for a in args]
    done = run_client(server.port, *args)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert re.fullmatch(
        rf"forkchat client: cannot verify the server's certificate at 127\.0\.0\.1:{server.port}: "
        rf".*{reason}.*; {re.escape(hint)}.*\n",
        done.stderr,
    ), done.stderr
    server.out.wait_for("^HANDSHAKE-FAILED")


def test_tls_to_a_plain_text_server_is_one_line_and_exit_1():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(DEADLINE)
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, CLIENT, "bob", "--port", str(port), "--tls"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HELLO forkchat/1 send your name\n")  # what a plain server says
                out, err = proc.communicate(timeout=DEADLINE)
        finally:
            reap_tree(proc)
    assert proc.returncode == 1 and out == b""
    err_text = err.decode()
    assert err_text.count("\n") == 1 and "Traceback" not in err_text
    assert err_text.startswith(f"forkchat client: TLS handshake with 127.0.0.1:{port} failed (")


def test_unreadable_cafile_is_a_usage_error(tmp_path):
    done = run_client(1, "--cafile", str(tmp_path / "missing.pem"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "cannot load CA certificates" in done.stderr


def test_usage_names_the_tls_options():
    done = run_client(1, "-h")
    assert done.returncode == 0
    assert "--tls" in done.stdout and "--cafile FILE" in done.stdout
