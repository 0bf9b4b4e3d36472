"""A store outage stays local: the JWKS is served from the last good copy while
PostgreSQL is unreachable, /readyz says not ready, and both recover without a
restart.  The outage is real: a TCP proxy between keyd and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.daemon import keyd, start, write_config
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_the_jwks_stays_up_while_the_store_is_down(tmp_path: Path, postgres_url: str) -> None:
    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        config = write_config(tmp_path, {"lifecycle.transport": {"enabled": False},
                                         "store": {"url": url}})
        keyd(config, "init")
        daemon = start(config)
        try:
            with daemon.public() as public:
                before = public.get("/jwks")
                assert before.status_code == 200
                proxy.refuse()
                during = [public.get("/jwks") for _ in range(3)]
                assert [r.status_code for r in during] == [200, 200, 200]
                assert {r.headers["etag"] for r in during} == {before.headers["etag"]}
                assert during[0].json() == before.json()
            with daemon.client() as anonymous:
                assert anonymous.get("/readyz").status_code == 503
                proxy.pass_through()
                tick = threading.Event()
                for _ in range(300):
                    if anonymous.get("/readyz").status_code == 200:
                        break
                    tick.wait(0.1)
                else:
                    raise AssertionError("not ready again after the store came back")
        finally:
            daemon.stop()
