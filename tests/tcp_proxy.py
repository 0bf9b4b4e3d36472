"""A loopback TCP proxy for fault injection: pass, refuse, or delay traffic.

A real network fault between keyd and a server (Vault, a JWKS host) cannot be
produced by the server itself, so tests put this proxy in between and switch
it while requests run::

    with TcpProxy("127.0.0.1", 8200) as proxy:
        client = make_client(proxy.addr)      # http://127.0.0.1:<port 0 pick>
        proxy.refuse()                        # every connection reset
        proxy.delay(5.0)                      # client bytes held 5 s each
        proxy.black_hole()                    # nothing forwarded, nothing closed
        proxy.black_hole(after=b"...")        # the same, once a client chunk has it
        proxy.pass_through()                  # back to normal

Switching modes cuts every open connection, so a client's pooled keep-alive
connection meets the new mode at once instead of slipping through.
"""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode = "pass"
        self._delay = 0.0
        self._trigger = b""
        self.holed = threading.Event()  # set when the black hole opened
        self._held: list[socket.socket] = []  # accepted in the black hole, never served
        self._conns: set[socket.socket] = set()
        self._closed = threading.Event()
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------- switching

    def pass_through(self) -> None:
        self._switch("pass", 0.0)

    def refuse(self) -> None:
        """Reset every connection, open or new (like a server gone away)."""
        self._switch("refuse", 0.0)

    def delay(self, seconds: float) -> None:
        """Hold each chunk the client sends for ``seconds`` before forwarding it."""
        self._switch("delay", seconds)

    def black_hole(self, *, after: bytes | None = None) -> None:
        """Stop forwarding, both ways, without closing anything (like a
        firewall dropping packets): peers wait until their own timeouts.
        ``after``: only once a client chunk containing it has been forwarded
        (a statement that reached the server, whose answer never comes back)."""
        with self._lock:
            if after is None:
                self._mode = "hole"
                self.holed.set()
            else:
                self._mode, self._trigger = "hole-after", after

    def _switch(self, mode: str, delay: float) -> None:
        with self._lock:
            self._mode, self._delay = mode, delay
            conns, self._conns = self._conns, set()
        for conn in conns:
            _reset(conn)

    # ----------------------------------------------------------------- plumbing

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                mode = self._mode
            if mode == "refuse":
                _reset(client)
                continue
            if mode == "hole":
                with self._lock:
                    self._held.append(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._conns.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if from_client:
                    with self._lock:
                        delay = self._delay if self._mode == "delay" else 0.0
                    # Event.wait, not sleep: close() ends the wait at once.
                    if delay and self._closed.wait(delay):
                        break
                with self._lock:
                    if self._mode == "hole":
                        continue  # dropped
                    if from_client and self._mode == "hole-after" and self._trigger in chunk:
                        self._mode = "hole"
                        self.holed.set()
                dst.sendall(chunk)
        except OSError:
            pass  # the other side went away or the proxy cut the connection
        finally:
            for s in (src, dst):
                _reset(s)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        self._accepter.join(timeout=5)
        self._switch("refuse", 0.0)
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            _reset(sock)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed or firewalled peer would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
