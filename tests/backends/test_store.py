"""The store on SQLite and PostgreSQL: schema, round trips, replay memory, faults."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from keyd.errors import ConfigError, Conflict, StoreUnavailable
from keyd.model import KeyState, Purpose
from keyd.store import queries
from keyd.store.db import Store
from keyd.store.tables import Certificate, KeyIntent, KeyVersion
from tests.fixtures.postgres import read_only_url

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
KL = timezone(timedelta(hours=8))  # Kuala Lumpur: an aware, non-UTC zone
TABLES = {"key_versions", "certificates", "clients", "audit_events", "audit_heads", "seen_jti",
          "alerts_sent",
          "key_intents", "leases", "replicas", "deployment"}


def _key(purpose: str = "signing", state: KeyState = KeyState.ACTIVE, kid: str | None = None,
         **kw: Any) -> KeyVersion:
    fields: dict[str, Any] = {
        "purpose": purpose, "state": state.value, "kid": kid, "backend": "local",
        "backend_ref": "ref-1", "key_size": 2048, "created_at": T0, "state_changed_at": T0,
        "public_key_pem": "-----BEGIN PUBLIC KEY-----\n...",
    }
    return KeyVersion(**{**fields, **kw})


def _cert(key_id: str, current: bool = True) -> Certificate:
    return Certificate(
        key_id=key_id, chain_pem="-----BEGIN CERTIFICATE-----\n...", thumbprint_s256="t" * 43,
        not_before=T0, not_after=T0 + timedelta(days=397), source="self-signed",
        created_at=T0, current=current,
    )


def test_migrate_twice_creates_every_table_and_changes_nothing_the_second_time(
    store_url: str,
) -> None:
    store = Store(store_url)
    try:
        store.migrate()
        store.migrate()
        with store.engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
            version = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert version == [("0005",)]
    finally:
        store.close()


def test_hand_written_migration_matches_the_sqlmodel_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, SQLModel.metadata)
    assert diff == []


def test_key_version_and_certificate_round_trip(store: Store) -> None:
    key = _key(kid="kid-1", publish_at=T0, activated_at=T0)
    with store.session() as s:
        s.add(key)
        s.flush()
        queries.add_certificate(s, _cert(key.id))
    assert key.id.startswith("kv_") and len(key.id) == 3 + 16
    with store.session() as s:
        by_kid = queries.key_by_kid(s, "kid-1")
        by_id = queries.key_by_id(s, key.id)
        cert = queries.current_certificate(s, key.id)
    assert by_kid is not None and by_id is not None and cert is not None
    assert by_kid.id == by_id.id == key.id
    assert (by_kid.purpose, by_kid.state, by_kid.key_size) == ("signing", "active", 2048)
    assert cert.not_after == T0 + timedelta(days=397)


def test_purpose_and_state_come_back_as_enums_but_are_stored_as_their_plain_values(
        store: Store) -> None:
    with store.session() as s:
        s.add(_key(purpose="encryption", kid="kid-str"))  # a value, as older callers pass
        s.add(_key(purpose=Purpose.SIGNING, state=KeyState.RETIRED, kid="kid-enum"))
        s.add(KeyIntent(id="kv_next", purpose=Purpose.TRANSPORT, replica="h:1", created_at=T0))
    with store.session() as s:
        raw = s.connection().execute(text(
            "SELECT kid, purpose, state FROM key_versions ORDER BY kid")).all()
        intent = s.connection().execute(text("SELECT purpose FROM key_intents")).scalar_one()
        enc, sig = queries.key_by_kid(s, "kid-str"), queries.key_by_kid(s, "kid-enum")
        unknown = queries.keys_of_purpose(s, "no-such-purpose")
    assert [tuple(r) for r in raw] == [("kid-enum", "signing", "retired"),
                                       ("kid-str", "encryption", "active")]
    assert intent == "transport"
    assert enc is not None and sig is not None
    assert enc.purpose is Purpose.ENCRYPTION and enc.state is KeyState.ACTIVE
    assert sig.purpose is Purpose.SIGNING and sig.state is KeyState.RETIRED
    assert unknown == []  # an unknown name finds nothing, as with a plain text column


def test_datetimes_come_back_as_aware_utc_whatever_zone_went_in(store: Store) -> None:
    in_kl = T0.astimezone(KL)
    key = _key(created_at=in_kl, destroy_after=in_kl + timedelta(days=7))
    with store.session() as s:
        s.add(key)
    with store.session() as s:
        back = queries.key_by_id(s, key.id)
    assert back is not None and back.destroy_after is not None
    assert back.created_at == T0 and back.created_at.utcoffset() == timedelta(0)
    assert back.created_at.tzinfo is UTC
    assert back.destroy_after == T0 + timedelta(days=7) and back.destroy_after.tzinfo is UTC


def test_naive_datetime_is_refused_as_a_programming_error(store: Store) -> None:
    with pytest.raises(ValueError, match="naive datetime"), store.session() as s:
        s.add(_key(created_at=datetime(2025, 1, 1)))  # noqa: DTZ001 - the point of the test


def test_a_kid_names_one_key_only_but_many_keys_may_have_none_yet(store: Store) -> None:
    with store.session() as s:
        s.add(_key(kid="same"))
        s.add(_key(purpose="encryption", state=KeyState.AWAITING_CERTIFICATE))
        s.add(_key(purpose="transport", state=KeyState.AWAITING_CERTIFICATE))
    with pytest.raises(Conflict, match="refused by the database"), store.session() as s:
        s.add(_key(kid="same"))
    with store.session() as s:
        assert len(queries.all_keys(s)) == 3


def test_hostile_kid_lookup_finds_nothing(store: Store) -> None:
    with store.session() as s:
        s.add(_key(kid="good"))
    with store.session() as s:
        for kid in ("' OR 1=1--", "../../etc/passwd", "k" * 10_000, "a\x00b"):
            assert queries.key_by_kid(s, kid) is None


def test_keys_by_state_and_published_keys_follow_the_state(store: Store) -> None:
    with store.session() as s:
        for state in KeyState:
            # pending and awaiting_certificate share a purpose's one waiting slot
            purpose = "transport" if state is KeyState.AWAITING_CERTIFICATE else "signing"
            s.add(_key(purpose=purpose, state=state, kid=f"kid-{state.value}"))
        s.add(_key(purpose="encryption", state=KeyState.ACTIVE, kid="enc"))
    with store.session() as s:
        active = queries.keys_by_state(s, "signing", [KeyState.ACTIVE])
        published = {k.state for k in queries.published_keys(s)}
        pending_or_retired = queries.keys_by_state(s, "signing", ["pending", "retired"])
    assert [k.kid for k in active] == ["kid-active"]
    assert published == {"pending", "active", "retired"}
    assert {k.state for k in pending_or_retired} == {"pending", "retired"}


def test_a_new_current_certificate_replaces_the_old_one(store: Store) -> None:
    key = _key(kid="k")
    with store.session() as s:
        s.add(key)
        s.flush()
        first = queries.add_certificate(s, _cert(key.id))
        second = queries.add_certificate(s, _cert(key.id))
    with store.session() as s:
        current = queries.current_certificate(s, key.id)
        history = queries.certificates_of(s, key.id)
    assert current is not None and current.id == second.id
    assert [(c.id, c.current) for c in history] == [(first.id, False), (second.id, True)]


def test_client_is_found_by_token_hash_and_names_are_unique(store: Store) -> None:
    with store.session() as s:
        queries.add_client(s, "consent-svc", "service", "ab" * 32, T0)
    with store.session() as s:
        client = queries.client_by_token_hash(s, "ab" * 32)
        assert queries.client_by_token_hash(s, "cd" * 32) is None
        assert queries.client_by_name(s, "consent-svc") is not None
    assert client is not None and client.name == "consent-svc" and client.revoked_at is None
    with pytest.raises(Conflict), store.session() as s:
        queries.add_client(s, "consent-svc", "service", "ef" * 32, T0)


def test_a_jti_is_accepted_once_even_after_a_restart(store_url: str) -> None:
    exp = T0 + timedelta(minutes=10)
    first = Store(store_url)
    try:
        first.migrate()
        with first.session() as s:
            assert queries.record_jti(s, "paynet", "jti-1", exp) is True
        with first.session() as s:
            assert queries.record_jti(s, "paynet", "jti-1", exp) is False
            # The same jti from another issuer is a different token.
            assert queries.record_jti(s, "other", "jti-1", exp) is True
    finally:
        first.close()
    restarted = Store(store_url)
    try:
        with restarted.session() as s:
            assert queries.record_jti(s, "paynet", "jti-1", exp) is False
            long_jti = "x" * 5000  # kept as its hash, still remembered
            assert queries.record_jti(s, "paynet", long_jti, exp) is True
            assert queries.record_jti(s, "paynet", long_jti, exp) is False
    finally:
        restarted.close()


def test_purge_forgets_only_expired_jtis(store: Store) -> None:
    with store.session() as s:
        queries.record_jti(s, "paynet", "old", T0)
        queries.record_jti(s, "paynet", "live", T0 + timedelta(hours=1))
    with store.session() as s:
        assert queries.purge_jti(s, T0 + timedelta(minutes=1)) == 1
    with store.session() as s:
        assert queries.record_jti(s, "paynet", "old", T0 + timedelta(hours=2)) is True
        assert queries.record_jti(s, "paynet", "live", T0 + timedelta(hours=2)) is False


def test_an_alert_is_marked_sent_once(store: Store) -> None:
    with store.session() as s:
        assert queries.mark_alert_sent(s, "kid-1", "30d", T0) is True
        assert queries.mark_alert_sent(s, "kid-1", "30d", T0) is False
        assert queries.mark_alert_sent(s, "kid-1", "14d", T0) is True


def test_a_read_only_database_gives_store_unavailable_not_a_sqlalchemy_error(
    store: Store, store_url: str
) -> None:
    with store.session() as s:
        s.add(_key(kid="before"))
    read_only = Store(read_only_url(store_url))
    try:
        with read_only.session() as s:  # reading still works
            assert queries.key_by_kid(s, "before") is not None
        with pytest.raises(StoreUnavailable, match="adding a key") as caught:
            with read_only.session("adding a key") as s:
                s.add(_key(kid="kid-param-after"))
        assert type(caught.value) is StoreUnavailable
        # The message names the operation and the database's reason, never
        # the statement or its parameters.
        assert "[SQL" not in caught.value.detail
        assert "kid-param-after" not in caught.value.detail
    finally:
        read_only.close()


def test_an_unreachable_postgresql_gives_store_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = Store(f"postgresql+psycopg://postgres@127.0.0.1:{port}/keyd")
    try:
        with pytest.raises(StoreUnavailable, match="ping"):
            store.ping()
    finally:
        store.close()


def test_ping_answers_on_a_working_store(store: Store) -> None:
    store.ping()
    with store.session() as s:
        assert queries.all_keys(s) == []


@pytest.mark.parametrize("url", ["mysql://root@localhost/keyd", "not a url"])
def test_an_unsupported_store_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="url"):
        Store(url)
