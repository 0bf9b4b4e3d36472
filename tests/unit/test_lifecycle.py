"""The pure state machine: allowed transitions and what is due at time t."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyd import lifecycle
from keyd.config import LifecycleSettings
from keyd.errors import Conflict
from keyd.lifecycle import Action, KeyTimes, Step, plan
from keyd.model import KeyState, Purpose

S = KeyState
T0 = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
LIFE = LifecycleSettings(
    purpose=Purpose.SIGNING, enabled=True, key_size=2048, validity=timedelta(days=397),
    rotate_after=timedelta(days=90), prepublish=timedelta(days=2), overlap=timedelta(days=7),
    renew_before=timedelta(days=30), exportable=False,
)


def active(activated: datetime = T0, not_after: datetime | None = None) -> KeyTimes:
    return KeyTimes("kv_a", S.ACTIVE, activated, publish_at=activated, activated_at=activated,
                    not_after=not_after or activated + timedelta(days=397))


def pending(published: datetime, key_id: str = "kv_p") -> KeyTimes:
    return KeyTimes(key_id, S.PENDING, published, publish_at=published)


def test_every_state_can_be_revoked_except_the_terminal_ones() -> None:
    for state in (S.AWAITING_CERTIFICATE, S.PENDING, S.ACTIVE, S.RETIRED):
        assert lifecycle.allowed(state, S.REVOKED)
    assert not lifecycle.allowed(S.DESTROYED, S.REVOKED)
    assert not lifecycle.allowed(S.REVOKED, S.ACTIVE)


def test_no_way_back_from_retired_destroyed_or_revoked_to_active() -> None:
    for state in (S.RETIRED, S.DESTROYED, S.REVOKED):
        with pytest.raises(Conflict, match=f"from {state.value} to active"):
            lifecycle.check_transition("kv_x", state, S.ACTIVE)
    assert not lifecycle.allowed(S.ACTIVE, S.PENDING)
    assert not lifecycle.allowed(S.RETIRED, S.ACTIVE)


def test_nothing_is_due_for_a_fresh_active_key() -> None:
    assert plan([active()], LIFE, T0 + 89 * DAY) == []


def test_rotation_is_due_after_rotate_after() -> None:
    actions = plan([active()], LIFE, T0 + 90 * DAY)
    assert [a.step for a in actions] == [Step.CREATE]


def test_rotation_is_due_when_the_certificate_nears_expiry() -> None:
    key = active(not_after=T0 + 40 * DAY)
    assert plan([key], LIFE, T0 + 9 * DAY) == []
    assert [a.step for a in plan([key], LIFE, T0 + 10 * DAY)] == [Step.CREATE]


def test_a_pending_key_waits_for_prepublish_before_activation() -> None:
    keys = [active(), pending(T0 + 90 * DAY)]
    assert plan(keys, LIFE, T0 + 91 * DAY) == []  # no second rotation while one is under way
    at = T0 + 92 * DAY
    assert plan(keys, LIFE, at - timedelta(seconds=1)) == []
    assert plan(keys, LIFE, at) == [Action(Step.ACTIVATE, "kv_p", plan(keys, LIFE, at)[0].reason)]


def test_a_retired_key_is_destroyed_only_after_its_overlap() -> None:
    retired = KeyTimes("kv_r", S.RETIRED, T0, retired_at=T0, destroy_after=T0 + 7 * DAY)
    assert [a.step for a in plan([active(), retired], LIFE, T0 + 7 * DAY - DAY)] == []
    assert [(a.step, a.key_id) for a in plan([active(), retired], LIFE, T0 + 7 * DAY)] == [
        (Step.DESTROY, "kv_r")]


def test_a_clock_jump_back_delays_but_never_repeats_or_hastens() -> None:
    """-1 h after a step: the plan is empty, not the step again."""
    keys = [active(), pending(T0 + 90 * DAY)]
    assert plan(keys, LIFE, T0 + 90 * DAY - timedelta(hours=1)) == []
    retired = KeyTimes("kv_r", S.RETIRED, T0, retired_at=T0, destroy_after=T0 + 7 * DAY)
    assert plan([active(T0 + 7 * DAY), retired], LIFE, T0 + 7 * DAY - timedelta(hours=1)) == []


def test_a_clock_jump_forward_starts_one_rotation_not_two() -> None:
    keys = [active()]
    actions = plan(keys, LIFE, T0 + 400 * DAY)
    assert [a.step for a in actions] == [Step.CREATE]
    # Once the new key exists (published at the jumped time), prepublish counts from it.
    keys.append(pending(T0 + 400 * DAY))
    assert plan(keys, LIFE, T0 + 400 * DAY + timedelta(hours=24)) == []


def test_no_active_key_activates_the_newest_pending_at_once() -> None:
    keys = [pending(T0, "kv_old"), pending(T0 + DAY, "kv_new")]
    assert [(a.step, a.key_id) for a in plan(keys, LIFE, T0 + DAY)] == [
        (Step.ACTIVATE, "kv_new")]


def test_no_key_at_all_creates_one_and_awaiting_production_keys_are_reported() -> None:
    assert [a.step for a in plan([], LIFE, T0)] == [Step.CREATE]
    awaiting = KeyTimes("kv_w", S.AWAITING_CERTIFICATE, T0)
    assert [(a.step, a.key_id) for a in plan([awaiting], LIFE, T0)] == [
        (Step.AWAIT_CERTIFICATE, "kv_w")]
    assert [a.step for a in plan([active(), awaiting], LIFE, T0 + 100 * DAY)] == [
        Step.AWAIT_CERTIFICATE]


def test_two_active_keys_are_repaired_by_retiring_the_older() -> None:
    older = active(T0)
    newer = KeyTimes("kv_b", S.ACTIVE, T0 + DAY, publish_at=T0, activated_at=T0 + DAY)
    assert [(a.step, a.key_id) for a in plan([older, newer], LIFE, T0 + 2 * DAY)] == [
        (Step.RETIRE, "kv_a")]


def test_next_event_is_the_earliest_due_time() -> None:
    retired = KeyTimes("kv_r", S.RETIRED, T0, retired_at=T0, destroy_after=T0 + 7 * DAY)
    assert lifecycle.next_event([active(), retired], LIFE) == T0 + 7 * DAY
    assert lifecycle.next_event([active()], LIFE) == T0 + 90 * DAY
    assert lifecycle.next_event([], LIFE) is None


def test_a_key_is_due_for_destruction_only_when_retired_and_its_overlap_has_ended() -> None:
    retired = KeyTimes("kv_r", S.RETIRED, T0, retired_at=T0, destroy_after=T0 + LIFE.overlap)
    assert not lifecycle.destroy_due(retired, T0 + LIFE.overlap - timedelta(seconds=1))
    assert lifecycle.destroy_due(retired, T0 + LIFE.overlap)
    revoked = KeyTimes("kv_x", S.REVOKED, T0, destroy_after=T0)
    assert not lifecycle.destroy_due(revoked, T0 + DAY)


def test_a_certified_key_signs_at_once_only_when_its_purpose_has_no_active_key() -> None:
    assert lifecycle.state_with_certificate(has_active=False) is S.ACTIVE
    assert lifecycle.state_with_certificate(has_active=True) is S.PENDING
    for has_active in (False, True):
        assert lifecycle.allowed(S.AWAITING_CERTIFICATE,
                                 lifecycle.state_with_certificate(has_active))
