"""The audit chain is one segment per replica: a replica cut off from
PostgreSQL in the middle of an append holds only its own segment's lock, and
the other replicas go on signing (and auditing) meanwhile.  The outage is
real: replica A reaches PostgreSQL through a TCP proxy that black-holes the
connection (nothing forwarded, nothing closed) right after A's append has
taken its segment lock in the database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from keyd.store.locks import AUDIT_LOCK
from tests.fixtures.daemon import Daemon, keyd, start, until, write_config
from tests.fixtures.openbao import BaoServer
from tests.fixtures.tcp_proxy import TcpProxy
from tests.fixtures.transit import least_privilege_transit, vault_tables

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.slow]

WAIT = 30.0  # liveness bound for event waits, not a timing assertion




def segment_lock_held(url: str, segment: str) -> bool:
    """True while some session holds ``segment``'s audit advisory lock."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND (classid::bigint << 32) | objid::bigint = "
            "(hashtextextended(%s, %s) & x'ffffffffffffffff'::bigint)",
            (segment, AUDIT_LOCK)).fetchone()
    return row is not None and int(row[0]) > 0


def audited_signs(url: str, segment: str) -> int:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM audit_events WHERE segment = %s "
                           "AND action = 'sign.jws' AND outcome = 'ok'", (segment,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def two(tmp_path: Path, postgres_url: str,
        openbao: BaoServer) -> Iterator[tuple[Daemon, Daemon, TcpProxy]]:
    """Replica A through a proxy to PostgreSQL, replica B straight to it."""
    transit = least_privilege_transit(openbao)
    with TcpProxy("127.0.0.1", 5432) as proxy:
        configs = []
        for name, url in (("a", postgres_url.replace("127.0.0.1:5432",
                                                      f"127.0.0.1:{proxy.port}")),
                          ("b", postgres_url)):
            folder = tmp_path / name
            folder.mkdir()
            tables = vault_tables(folder, openbao.addr, transit, transport=False)
            tables["store"] = {"url": url}
            configs.append(write_config(folder, tables))
        keyd(configs[1], "init")
        service = keyd(configs[1], "client", "add", "svc-1", "--policy",
                       "service").stdout.strip()
        daemons = [start(c, service_token=service) for c in configs]
        try:
            yield daemons[0], daemons[1], proxy
        finally:
            proxy.pass_through()
            for d in daemons:
                d.stop()


def segment_of(daemon: Daemon) -> str:
    with daemon.client() as anonymous:
        replica = anonymous.get("/readyz").json()["replica"]
    assert isinstance(replica, str)
    return replica


def test_a_replica_stuck_in_an_append_does_not_stop_the_others_signing(
        two: tuple[Daemon, Daemon, TcpProxy], postgres_url: str) -> None:
    a, b, proxy = two
    seg_a, seg_b = segment_of(a), segment_of(b)
    assert seg_a != seg_b
    with a.client(a.service_token) as client_a:
        assert client_a.post("/v1/sign/jws", json={"payload": 0}).status_code == 200

    # A's next append takes its segment lock in PostgreSQL; the proxy
    # forwards that statement, then drops everything: A's transaction stays
    # open in the database, holding the lock, and A waits for an answer.
    proxy.black_hole(after=b"pg_advisory_xact_lock")
    stuck: list[int] = []

    def sign_on_a() -> None:
        try:
            with a.client(a.service_token) as client:
                stuck.append(client.post("/v1/sign/jws", json={"payload": "a"}).status_code)
        except httpx.HTTPError:
            stuck.append(0)

    in_flight = threading.Thread(target=sign_on_a, daemon=True)
    in_flight.start()
    until(proxy.holed.is_set, "A's append reached the black hole")
    until(lambda: segment_lock_held(postgres_url, seg_a), "A's segment lock held in PostgreSQL")

    before = audited_signs(postgres_url, seg_b)
    with b.client(b.service_token) as client_b:
        answers = [client_b.post("/v1/sign/jws", json={"payload": n}) for n in range(10)]
    assert [r.status_code for r in answers] == [200] * 10
    assert audited_signs(postgres_url, seg_b) == before + 10
    # The outage lasted through all of them: A still holds its lock, its sign unanswered.
    assert segment_lock_held(postgres_url, seg_a)
    assert stuck == []

    # The network comes back: A's stuck append fails closed (no token went
    # out unaudited) or lands; either way every segment verifies.
    proxy.pass_through()
    in_flight.join(WAIT)
    assert len(stuck) == 1 and stuck[0] in (200, 503), stuck
    until(lambda: not segment_lock_held(postgres_url, seg_a), "A's lock released")
    with a.client(a.service_token) as client_a:
        until(lambda: client_a.post("/v1/sign/jws", json={"payload": 1}).status_code == 200,
              "A signs again")
    verified = keyd(b.config, "audit", "verify")
    assert verified.stdout.startswith("audit chain intact")
    head = keyd(b.config, "audit", "head").stdout.strip()
    assert keyd(a.config, "audit", "verify", "--expect", head).returncode == 0
