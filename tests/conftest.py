"""Shared fixtures.  Service fixtures (OpenBao, SoftHSM2, PostgreSQL) live in
tests/fixtures/ and are started once per test session, shared by xdist workers."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.openbao",
    "tests.fixtures.softhsm",
    "tests.fixtures.transit",
]
