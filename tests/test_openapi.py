"""/openapi.json describes the local API truly: schemathesis generates requests
from it against the live daemon and checks every answer against it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.daemon import Daemon, running

pytestmark = pytest.mark.slow  # a real keyd process per test or module

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running(tmp_path_factory.mktemp("openapi")) as d:
        yield d


def test_every_answer_matches_the_description(daemon: Daemon) -> None:
    # schemathesis's pytest plugin does not run under pytest 9 yet, so the
    # operations are driven here with hypothesis directly.
    schema = schemathesis.openapi.from_url(daemon.api_url + "/openapi.json")
    auth = {"Authorization": f"Bearer {daemon.admin_token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            # Token endpoints rightly answer 422 to schema-valid garbage, so
            # "positive data acceptance" does not apply; everything else does.
            case.call_and_validate(headers=auth, checks=CHECKS)

        check()
    assert daemon.healthy()


def test_the_description_names_every_call(daemon: Daemon) -> None:
    with daemon.client() as client:
        paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/v1/sign/jws", "/v1/sign/jwt", "/v1/client-assertion", "/v1/decrypt/jwe",
            "/v1/verify/jws", "/v1/unwrap", "/v1/verify/universal-link", "/v1/keys"} <= paths
