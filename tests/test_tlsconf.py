"""TLS contexts and the non-blocking server handshake, over real sockets and real certificates."""

import select
import shutil
import socket
import ssl
import struct
import subprocess

import pytest

from forkchat.tlsconf import (
    TlsError,
    client_context,
    handshake_step,
    server_context,
)

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl CLI")


@pytest.fixture
def server(tls_pair):
    """A factory wrapping the server end of a socket for a non-blocking handshake."""
    context = server_context(*tls_pair)

    def wrap(sock: socket.socket) -> ssl.SSLSocket:
        sock.setblocking(False)
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    return wrap


def drive(server_end: ssl.SSLSocket, client_end: ssl.SSLSocket | None = None) -> str:
    """Run the server's handshake steps (and the client's, if given) to the server's end.

    Returns "done" or raises what handshake_step raised. A client that fails stops
    taking part; its error is kept on ``drive.client_error``.
    """
    drive.client_error = None
    for _ in range(100):
        state = handshake_step(server_end)
        if client_end is not None:
            try:
                client_end.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as exc:
                drive.client_error, client_end = exc, None
        if state == "done":
            return state
        assert state in ("want-read", "want-write")
        wanted = ([server_end], []) if state == "want-read" else ([], [server_end])
        select.select(*wanted, [], 5)
    raise AssertionError("handshake did not end")


def tls_client(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
    """The non-blocking client end of a handshake, for localhost."""
    sock.setblocking(False)
    return context.wrap_socket(sock, server_hostname="localhost", do_handshake_on_connect=False)


# ---- contexts ------------------------------------------------------------------------


def test_server_context_is_tls12_or_later_without_tickets(tls_pair):
    context = server_context(*tls_pair)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.num_tickets == 0
    assert context.options & ssl.OP_NO_RENEGOTIATION


def test_client_context_verifies_name_and_chain(tls_pair):
    for context in (client_context(), client_context(tls_pair[0])):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def reason_for(cert: str, key: str) -> str:
    """server_context's one-line reason for a bad pair."""
    with pytest.raises(TlsError) as info:
        server_context(cert, key)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_files_are_named(tmp_path, tls_pair):
    cert, key = tls_pair
    missing = str(tmp_path / "missing.pem")
    assert reason_for(missing, key) == f"cannot read {missing}: No such file or directory"
    assert reason_for(cert, missing) == f"cannot read {missing}: No such file or directory"


def test_a_key_of_another_certificate_is_a_mismatch(make_cert, tls_pair):
    _, other_key = make_cert("other")
    assert "does not match the certificate" in reason_for(tls_pair[0], other_key)


def test_files_that_are_not_pem_are_named(tmp_path, tls_pair):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert reason_for(str(junk), tls_pair[1]) == f"{junk} holds no PEM certificate"
    assert reason_for(tls_pair[1], tls_pair[1]) == f"{tls_pair[1]} holds no PEM certificate"
    assert "holds no usable PEM private key" in reason_for(tls_pair[0], str(junk))


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path, tls_pair):
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(
        [
            *("openssl", "rsa", "-in", tls_pair[1], "-aes256", "-passout", "pass:secret"),
            *("-out", str(encrypted)),
        ],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert "encrypted" in reason_for(tls_pair[0], str(encrypted))


def test_client_context_with_a_bad_cafile(tmp_path, tls_pair):
    with pytest.raises(TlsError, match=r"cannot read .*missing"):
        client_context(str(tmp_path / "missing"))
    with pytest.raises(TlsError, match="holds no PEM certificate"):
        client_context(tls_pair[1])


# ---- handshakes ----------------------------------------------------------------------


@pytest.fixture
def pair():
    """A connected socket pair: (server end, client end)."""
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


def test_a_trusting_client_completes_and_talks(server, pair, tls_pair):
    server_end = server(pair[0])
    client_end = tls_client(pair[1], client_context(tls_pair[0]))
    assert drive(server_end, client_end) == "done"
    assert server_end.version() in ("TLSv1.2", "TLSv1.3")
    client_end.setblocking(True)
    client_end.sendall(b"alice\nhello\n")
    select.select([server_end], [], [], 5)
    assert server_end.recv(100) == b"alice\nhello\n"


def test_a_silent_client_leaves_the_server_wanting_to_read(server, pair):
    server_end = server(pair[0])
    assert handshake_step(server_end) == "want-read"
    assert handshake_step(server_end) == "want-read"


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"alice\n", "TLS handshake failed: not TLS: a plain-text client"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "TLS handshake failed: not TLS: a plain HTTP request",
        ),
    ],
)
def test_a_plain_text_client_is_one_line(server, pair, first, reason):
    server_end = server(pair[0])
    pair[1].sendall(first)
    with pytest.raises(TlsError) as info:
        drive(server_end)
    assert str(info.value) == reason


def test_a_client_that_closes_at_once(server, pair):
    server_end = server(pair[0])
    pair[1].close()
    with pytest.raises(TlsError, match="the client closed the connection"):
        drive(server_end)


def client_hello() -> bytes:
    """The bytes of a real ClientHello, from an in-memory TLS client."""
    outgoing = ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    return outgoing.read()


def test_a_client_that_resets_mid_handshake(server):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    with accepted, client:
        server_end = server(accepted)
        client.sendall(client_hello())
        select.select([server_end], [], [], 5)
        assert handshake_step(server_end) == "want-read"  # our answer is sent
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # linger 0: RST
        with pytest.raises(TlsError, match=r"the client went away \(Connection reset by peer\)"):
            drive(server_end)


def test_a_client_that_does_not_trust_us_is_one_line(server, pair, make_cert):
    server_end = server(pair[0])
    stranger_ca, _ = make_cert("stranger")
    client_end = tls_client(pair[1], client_context(stranger_ca))
    with pytest.raises(TlsError) as info:
        drive(server_end, client_end)
    assert str(info.value) == (
        "TLS handshake failed: the client does not trust our certificate (unknown CA)"
    )
    assert isinstance(drive.client_error, ssl.SSLCertVerificationError)
    assert drive.client_error.verify_message == "self-signed certificate"


def test_a_client_that_insists_on_tls11_is_refused(server, pair):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.warns(DeprecationWarning):
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.1 above level 0
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot make a TLS 1.1 client")
    server_end = server(pair[0])
    client_end = tls_client(pair[1], context)
    with pytest.raises(TlsError, match=r"older than 1\.2|refuses TLS 1\.2"):
        drive(server_end, client_end)


@pytest.mark.skipif(not shutil.which("openssl"), reason="no openssl")
def test_openssl_s_client_completes_and_talks(server, tls_pair):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = subprocess.Popen(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{port}"),
                *("-CAfile", tls_pair[0], "-verify_return_error", "-quiet"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            listener.settimeout(10)
            accepted, _ = listener.accept()
            server_end = server(accepted)
            assert drive(server_end) == "done"
            client.stdin.write(b"bob\n")
            client.stdin.flush()
            select.select([server_end], [], [], 10)
            assert server_end.recv(100) == b"bob\n"
            server_end.setblocking(True)
            server_end.sendall(b"WAIT for a partner\n")
            assert client.stdout.readline() == b"WAIT for a partner\n"
            server_end.close()
        finally:
            client.kill()
            client.communicate(timeout=10)
