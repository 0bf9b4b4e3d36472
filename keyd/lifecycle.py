"""The key lifecycle as pure code: which transitions exist, and what is due at time t.

No I/O here.  ``plan()`` looks at one purpose's key versions (their stored
timestamps) and the lifecycle settings and answers what must happen now; the
reconciler in keyd/jobs.py carries the answer out, one atomic transaction per
step.  Because the answer depends only on stored state and the time, running
the reconciler twice, after a crash, or after the clock jumped is harmless:
a step already taken is no longer due.

Timing (SPEC "Key lifecycle"): a rotation is due when the active key has been
active for ``rotate_after`` or its certificate expires within
``renew_before``.  A new key is published (``pending``) at ``publish_at`` and
may sign only once ``publish_at + prepublish`` has passed, because verifiers
cache our JWKS (PayNet: 15 minutes).  The key it replaces is retired in the
same transaction and stays published until ``destroy_after`` (retirement +
``overlap``), so tokens it made keep verifying.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from keyd.config import LifecycleSettings
from keyd.errors import Conflict
from keyd.model import KeyState

S = KeyState

# Every transition the lifecycle allows.  AWAITING_CERTIFICATE -> ACTIVE is the
# first key of a purpose (at init, or when a purpose has no active key at all:
# nothing can sign then, so waiting for prepublish would only prolong an outage).
TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    S.AWAITING_CERTIFICATE: frozenset({S.PENDING, S.ACTIVE, S.REVOKED}),
    S.PENDING: frozenset({S.ACTIVE, S.RETIRED, S.REVOKED}),
    S.ACTIVE: frozenset({S.RETIRED, S.REVOKED}),
    S.RETIRED: frozenset({S.DESTROYED, S.REVOKED}),
    S.DESTROYED: frozenset(),
    S.REVOKED: frozenset(),
}

# States whose private key must still exist in the backend.
LIVE_STATES = frozenset({S.AWAITING_CERTIFICATE, S.PENDING, S.ACTIVE, S.RETIRED})


def allowed(old: KeyState, new: KeyState) -> bool:
    return new in TRANSITIONS[old]


def check_transition(key_id: str, old: KeyState, new: KeyState) -> None:
    """Raise Conflict unless ``old -> new`` is a lifecycle transition."""
    if not allowed(old, new):
        raise Conflict(f"key {key_id} cannot go from {old.value} to {new.value}")


@dataclass(frozen=True)
class KeyTimes:
    """What the planner needs of one key version: its state and timestamps."""

    id: str
    state: KeyState
    created_at: datetime
    publish_at: datetime | None = None
    activated_at: datetime | None = None
    retired_at: datetime | None = None
    destroy_after: datetime | None = None
    not_after: datetime | None = None  # the current certificate's expiry


class Step(StrEnum):
    CREATE = "create"  # generate a key: a rotation (or a purpose with no key)
    ACTIVATE = "activate"  # key_id becomes active; the active key (if any) retires
    DESTROY = "destroy"  # a retired key's overlap is over
    RETIRE = "retire"  # a surplus active key (repair; never planned in normal runs)
    AWAIT_CERTIFICATE = "await_certificate"  # production: a CSR waits for the CA


@dataclass(frozen=True)
class Action:
    step: Step
    key_id: str | None = None
    reason: str = ""


def rotation_due(active: KeyTimes, life: LifecycleSettings, now: datetime) -> str | None:
    """Why the active key must be replaced now, or None."""
    if active.activated_at is not None and active.activated_at + life.rotate_after <= now:
        return f"active since {active.activated_at.isoformat()} (rotate_after {life.rotate_after})"
    if active.not_after is not None and active.not_after - life.renew_before <= now:
        return (f"certificate expires {active.not_after.isoformat()} "
                f"(renew_before {life.renew_before})")
    return None


def ready_at(key: KeyTimes, life: LifecycleSettings) -> datetime | None:
    """When a pending key may start signing."""
    return None if key.publish_at is None else key.publish_at + life.prepublish


def plan(keys: list[KeyTimes], life: LifecycleSettings, now: datetime) -> list[Action]:
    """What is due for one purpose at ``now``, in the order to carry it out."""
    actions: list[Action] = []
    by_state: dict[KeyState, list[KeyTimes]] = {s: [] for s in KeyState}
    for key in keys:
        by_state[key.state].append(key)
    actives = sorted(by_state[S.ACTIVE], key=_activation_order)
    pendings = sorted(by_state[S.PENDING], key=lambda k: (k.publish_at or k.created_at, k.id))
    awaiting = by_state[S.AWAITING_CERTIFICATE]

    if len(actives) > 1:
        # Never produced by keyd (activation retires the old key in the same
        # transaction), but if a store arrives like this, keep the newest.
        actives_to_retire = actives[:-1]
        actions.extend(Action(Step.RETIRE, k.id, "more than one active key") for k in
                       actives_to_retire)
        actives = actives[-1:]

    if not actives:
        if pendings:
            # Nothing can sign: use the newest published key at once.
            actions.append(Action(Step.ACTIVATE, pendings[-1].id, "no active key"))
        elif awaiting:
            actions.append(Action(Step.AWAIT_CERTIFICATE, awaiting[-1].id, "no active key"))
        else:
            actions.append(Action(Step.CREATE, None, "no active key"))
    else:
        active = actives[0]
        ready = [k for k in pendings if (r := ready_at(k, life)) is not None and r <= now]
        if ready:
            actions.append(Action(Step.ACTIVATE, ready[-1].id,
                                  f"published since {_iso(ready[-1].publish_at)}"))
        elif not pendings and not awaiting:
            reason = rotation_due(active, life, now)
            if reason is not None:
                actions.append(Action(Step.CREATE, None, reason))
        elif awaiting and not pendings:
            actions.append(Action(Step.AWAIT_CERTIFICATE, awaiting[-1].id, "rotation"))

    for key in by_state[S.RETIRED]:
        if destroy_due(key, now):
            actions.append(Action(Step.DESTROY, key.id, f"overlap ended {_iso(key.destroy_after)}"))
    return actions


def next_event(keys: list[KeyTimes], life: LifecycleSettings) -> datetime | None:
    """The earliest stored time at which plan() may have new work (for tests, status)."""
    times: list[datetime] = []
    for key in keys:
        if key.state is S.ACTIVE:
            if key.activated_at is not None:
                times.append(key.activated_at + life.rotate_after)
            if key.not_after is not None:
                times.append(key.not_after - life.renew_before)
        elif key.state is S.PENDING and (r := ready_at(key, life)) is not None:
            times.append(r)
        elif key.state is S.RETIRED and key.destroy_after is not None:
            times.append(key.destroy_after)
    return min(times, default=None)


def retire_times(now: datetime, life: LifecycleSettings) -> tuple[datetime, datetime]:
    """(retired_at, destroy_after) for a key retired at ``now``."""
    return now, now + life.overlap


def destroy_due(key: KeyTimes, now: datetime) -> bool:
    """Is ``key`` a retired key whose overlap has ended?"""
    return key.state is S.RETIRED and key.destroy_after is not None and key.destroy_after <= now


def state_with_certificate(has_active: bool) -> KeyState:
    """The state a key awaiting its certificate moves to once it has one: active
    when its purpose has no active key (nothing could sign otherwise), else
    pending, to be activated after ``prepublish``."""
    return S.PENDING if has_active else S.ACTIVE


def _activation_order(key: KeyTimes) -> tuple[datetime, str]:
    return (key.activated_at or key.created_at, key.id)


def _iso(when: datetime | None) -> str:
    return "-" if when is None else when.isoformat()

