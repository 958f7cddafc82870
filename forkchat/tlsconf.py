"""TLS for forkchat: server and client contexts, and a non-blocking server handshake step.

The parent process runs each handshake on readiness, one ``handshake_step`` at a time,
and turns any failure into one log line; the room worker then carries the session on.
"""

from __future__ import annotations

import ssl

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# What a TLS connection's except clauses catch (``conn.Conn.use_tls``): a read or write
# that cannot go on now (either may need the other direction), an end of input without
# close_notify, and any TLS failure.
TLS_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
TLS_EOF = ssl.SSLEOFError
TLS_ERROR = ssl.SSLError

# OpenSSL reason codes, as ssl.SSLError.reason gives them, and what they mean to an operator.
HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "not TLS: a plain-text client",
    "HTTP_REQUEST": "not TLS: a plain HTTP request",
    "HTTPS_PROXY_REQUEST": "not TLS: an HTTP proxy CONNECT request",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS versions older than 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the client refuses TLS 1.2 and later",
    "NO_SHARED_CIPHER": "no cipher in common with the client",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected our certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client says our certificate has expired",
    "TLSV1_ALERT_DECRYPT_ERROR": "the client failed to verify the handshake",
    "TLSV1_ALERT_INTERNAL_ERROR": "the client reported an internal error",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the client aborted the handshake",
}


class TlsError(Exception):
    """A TLS set-up or handshake failure; str() is one line fit for the log."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context, TLS 1.2 or later, holding the PEM certificate chain and key.

    Raises ``TlsError`` when a file cannot be read, is not PEM, the key is encrypted
    (a daemon cannot ask for a passphrase), or the key does not match the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    # No TLS 1.3 session tickets: they are written after the handshake, and a chat
    # connection lasts long enough that resuming one saves nothing.
    context.num_tickets = 0
    context.options |= ssl.OP_NO_RENEGOTIATION
    load_pair(context, cert, key)
    return context


def load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """Load the certificate chain and key into ``context``, or raise ``TlsError``."""
    check_certificate_file(cert)
    try:
        with open(key, "rb"):
            pass
        context.load_cert_chain(cert, key, password=refuse_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"the key {key} does not match the certificate {cert}") from exc
        detail = f" ({exc.reason})" if exc.reason else ""
        raise TlsError(f"{key} holds no usable PEM private key{detail}") from exc
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def check_certificate_file(cert: str) -> None:
    """Raise ``TlsError`` unless ``cert`` can be read and holds a PEM certificate."""
    try:
        with open(cert, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise TlsError(f"cannot read {cert}: {exc.strerror}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError(f"{cert} holds no PEM certificate")


def refuse_passphrase() -> bytes:
    """Password callback for an encrypted key: refuse rather than prompt on a terminal."""
    raise TlsError("the private key is encrypted; give an unencrypted key file")


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context, TLS 1.2 or later, verifying the server's certificate and name.

    Trusts the system's CAs, or only ``cafile`` (a private CA or a self-signed
    certificate) when given. Raises ``TlsError`` when ``cafile`` cannot be loaded.
    """
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise TlsError(f"{cafile} holds no PEM certificate") from exc
    except OSError as exc:
        raise TlsError(f"cannot read {cafile}: {exc.strerror}") from exc
    context.minimum_version = MINIMUM_VERSION
    return context


def handshake_step(sslsock: ssl.SSLSocket) -> str:
    """Advance a non-blocking handshake; return "done", "want-read" or "want-write".

    "want-read" / "want-write": call again when the socket is readable / writable.
    Raises ``TlsError`` with a one-line reason when the handshake fails: a plain-text
    client, an HTTP request, an alert from the client (unknown CA...), a closed or reset
    connection.
    """
    try:
        sslsock.do_handshake()
    except ssl.SSLWantReadError:
        return "want-read"
    except ssl.SSLWantWriteError:
        return "want-write"
    except OSError as exc:
        raise TlsError(describe_handshake_error(exc)) from exc
    return "done"


def describe_handshake_error(exc: OSError) -> str:
    """One line for a failed handshake, from the server's side."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "TLS handshake: the client closed the connection"
    if isinstance(exc, ssl.SSLError):
        reason = HANDSHAKE_REASONS.get(exc.reason or "", exc.reason or str(exc))
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, ConnectionError):
        return f"TLS handshake: the client went away ({exc.strerror})"
    return f"TLS handshake: connection failed: {exc.strerror or exc}"
