"""Abuse limits on the local API: a flooding client is slowed and a trickling
one cut off, while a legitimate caller keeps signing."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.daemon import Daemon, keyd, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module

LIMITS = {"rate_limit": 1, "rate_burst": 5, "header_timeout": "1s", "body_timeout": "1s"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running(tmp_path_factory.mktemp("limits"), {"api": LIMITS}) as d:
        yield d


def raw(daemon: Daemon) -> socket.socket:
    host, port = daemon.api_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket timeout)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass  # closed on us after the answer: what was read is the answer
    return data


def test_headers_that_never_finish_get_408_and_the_connection_closes(daemon: Daemon) -> None:
    with raw(daemon) as sock:
        sock.sendall(b"POST /v1/sign/jws HTTP/1.1\r\nHost: keyd\r\nX-Slow: ")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert b'"error": "request_timeout"' in reply


def test_a_trickling_client_is_cut_off_even_while_it_keeps_sending(daemon: Daemon) -> None:
    stop = threading.Event()
    with raw(daemon) as sock:
        sock.sendall(b"POST /v1/sign/jws HTTP/1.1\r\nHost: keyd\r\n")

        def trickle() -> None:
            while not stop.wait(0.2):
                try:
                    sock.sendall(b"X")
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        reply = read_all(sock)
        stop.set()
        thread.join(5)
    assert reply.startswith(b"HTTP/1.1 408")


def test_oversized_headers_get_431(daemon: Daemon) -> None:
    with raw(daemon) as sock:
        big = b"X-Big: " + b"a" * 40_000 + b"\r\n"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: keyd\r\n" + big + b"\r\n")
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431")


def test_a_body_that_never_arrives_gets_408(daemon: Daemon) -> None:
    with raw(daemon) as sock:
        sock.sendall(b"POST /v1/sign/jws HTTP/1.1\r\nHost: keyd\r\nAuthorization: Bearer "
                     + daemon.service_token.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pa")
        reply = sock.recv(4096)
        while not reply.endswith(b"}") and (chunk := sock.recv(4096)):
            reply += chunk  # the JSON body may come in its own segment
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in reply


def test_legitimate_caller_keeps_signing_while_one_floods_and_one_trickles(
    daemon: Daemon,
) -> None:
    polite_token = keyd(daemon.config, "client", "add", "polite", "--policy",
                        "service").stdout.strip()
    flood_token = keyd(daemon.config, "client", "add", "flooder", "--policy",
                       "service").stdout.strip()
    flood: list[httpx.Response] = []
    stop = threading.Event()

    def flooder() -> None:
        with daemon.client(flood_token) as client:
            while not stop.is_set() and len(flood) < 40:
                flood.append(client.post("/v1/sign/jws", json={"payload": "flood"}))

    def trickler() -> None:
        with raw(daemon) as sock:
            sock.sendall(b"POST /v1/sign/jws HTTP/1.1\r\n")
            while not stop.wait(0.2):
                try:
                    sock.sendall(b"X")
                except OSError:
                    return

    threads = [threading.Thread(target=flooder), threading.Thread(target=trickler)]
    for thread in threads:
        thread.start()
    try:
        with daemon.client(polite_token) as polite:
            calm = [polite.post("/v1/sign/jws", json={"payload": i}) for i in range(4)]
    finally:
        for thread in threads[:1]:
            thread.join(60)
        stop.set()
        threads[1].join(10)
    assert [r.status_code for r in calm] == [200] * 4
    limited = [r for r in flood if r.status_code == 429]
    assert len(limited) >= 20
    assert all(r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
               for r in limited)
    assert daemon.healthy()
