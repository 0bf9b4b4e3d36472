"""The PKCS#11 module, the token, the login and a pool of sessions.

Three facts of PKCS#11 shape this module:

- ``C_Initialize``/``C_Finalize`` are per process, not per handle: a second
  ``pkcs11.lib`` on the same path fails, and finalising one (python-pkcs11
  does so when a ``lib`` is garbage-collected) ends every session in the
  process.  So each module is loaded once per process and kept for good.
- python-pkcs11 0.10 calls ``C_Initialize(NULL_PTR)``, which by the standard
  promises the module that no two threads call it at once; SoftHSM2 then
  turns its own locking off and crashes under concurrent signs.  keyd calls
  ``C_Initialize`` itself, with ``CKF_OS_LOCKING_OK``, and hands python-pkcs11
  the module already initialised (see :func:`load_module`).
- The login is per application and token, not per session: one ``C_Login``
  makes every session of the process a user session, and a ``C_Logout`` on
  any of them ends it for all.  python-pkcs11 logs out when it closes a
  session that it logged in with, so the one session that logs in is kept for
  the life of the process; every pooled session is opened without a PIN and
  can be closed freely.  When the last session closes (a ``C_CloseAllSessions``
  from anyone, a token pulled out) the token logs out by itself, so a fresh
  session checks the login and logs in again.
- A python-pkcs11 ``Session`` serialises its operations on one lock, so
  concurrent signs need several sessions: the pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pkcs11
import pkcs11._pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from keyd.config import Secret
from keyd.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Lib

# A session or the login is gone: worth one retry on a fresh session.  A stale
# object handle (the object was destroyed, or its session died) belongs here
# too: the retry looks the key up again by CKA_ID.
LOST_SESSION_ERRORS: tuple[type[p11.PKCS11Error], ...] = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.TokenNotPresent,
    p11.DeviceRemoved,
    p11.UserNotLoggedIn,
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
)


class SessionLost(p11.PKCS11Error):
    """Raised by keyd itself when a session turns out to be dead or logged out."""


def session_usable(session: pkcs11.Session) -> bool:
    """Whether the session still answers and is still logged in.

    A session closed (or logged out) from elsewhere while an operation runs
    on it does not always answer CKR_SESSION_HANDLE_INVALID: SoftHSM2 answers
    CKR_GENERAL_ERROR for a sign cut short by a logout.  Asking the session
    again tells an outage from a real error.
    """
    try:
        return logged_in(session)
    except p11.PKCS11Error:
        return False


_libs: dict[str, Lib] = {}
_handles: list[ctypes.CDLL] = []  # kept so the module is never unloaded
_libs_lock = threading.Lock()

_CKF_OS_LOCKING_OK = 0x02
_CKR_CANT_LOCK = 0x0A
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _FunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST: the version, then C_Initialize."""

    _fields_ = [("version", _Version), ("C_Initialize", ctypes.c_void_p)]


class _InitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


def _initialize_for_threads(path: str) -> None:
    """C_Initialize with CKF_OS_LOCKING_OK: keyd calls the module from many threads."""
    handle = ctypes.CDLL(path)
    head = ctypes.POINTER(_FunctionListHead)()
    rv = handle.C_GetFunctionList(ctypes.byref(head))
    if rv != 0 or not head:
        raise ConfigError(f"pkcs11: C_GetFunctionList of {path} answered {rv:#x}")
    initialize = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(head.contents.C_Initialize)
    args = _InitializeArgs(flags=_CKF_OS_LOCKING_OK)
    rv = initialize(ctypes.addressof(args))
    if rv == _CKR_CANT_LOCK:
        raise ConfigError(f"pkcs11: library {path} cannot be used from several threads")
    if rv == _CKR_CRYPTOKI_ALREADY_INITIALIZED:
        raise ConfigError(
            f"pkcs11: library {path} was initialised elsewhere in this process, "
            "possibly without thread locking; load it through keyd only"
        )
    if rv != 0:
        raise ConfigError(f"pkcs11: C_Initialize of {path} answered {rv:#x}")
    _handles.append(handle)


def load_module(path: Path) -> Lib:
    """The process's one handle on the PKCS#11 module at ``path``.

    The module is initialised for threads here, then wrapped by python-pkcs11
    without its own ``__init__`` (which would call ``C_Initialize(NULL_PTR)``
    and fail with CKR_CRYPTOKI_ALREADY_INITIALIZED); ``__cinit__`` alone loads
    the function list, which is all the sessions need.  Never finalised.
    """
    if not path.is_file():
        raise ConfigError(f"pkcs11: library {path} not found")
    key = str(path.resolve())
    with _libs_lock:
        if key not in _libs:
            try:
                _initialize_for_threads(key)
                # Cython: __new__ runs __cinit__ (dlopen, C_GetFunctionList) only.
                _libs[key] = pkcs11._pkcs11.lib.__new__(pkcs11._pkcs11.lib, key)  # type: ignore[call-arg]
            except (OSError, AttributeError) as e:
                raise ConfigError(f"pkcs11: library {path} cannot be loaded: {e}") from e
            except p11.PKCS11Error as e:
                raise ConfigError(f"pkcs11: library {path} cannot be loaded: {e!r}") from e
        return _libs[key]


def find_token(lib: Lib, module: Path, label: str, serial: str) -> pkcs11.Token:
    """The one token named by ``serial`` (when set) or ``label``."""
    try:
        tokens = list(lib.get_tokens())
    except p11.PKCS11Error as e:
        raise BackendUnavailable(f"pkcs11: cannot list the tokens of {module}: {e!r}") from e
    if serial:
        matches = [t for t in tokens if t.serial.decode(errors="replace").strip() == serial]
        wanted = f"serial {serial!r}"
    else:
        matches = [t for t in tokens if t.label == label]
        wanted = f"label {label!r}"
    if len(matches) == 1:
        return matches[0]
    present = ", ".join(
        f"{t.label!r} (serial {t.serial.decode(errors='replace').strip()})" for t in tokens
    )
    if not matches:
        raise ConfigError(
            f"pkcs11: no token with {wanted} in {module}; tokens present: {present or 'none'}"
        )
    raise ConfigError(f"pkcs11: {len(matches)} tokens with {wanted} in {module}: {present}")


@dataclass
class _Login:
    """The process's login to one token: the session that holds it, the PIN's digest."""

    session: pkcs11.Session
    pin_digest: bytes


_logins: dict[tuple[str, int], _Login] = {}
_logins_lock = threading.Lock()


def logged_in(session: pkcs11.Session) -> bool:
    """Whether the application is logged in: only then may it make a private object.

    PKCS#11 has no "am I logged in" call that python-pkcs11 exposes, and
    trying C_Login again answers CKR_USER_ALREADY_LOGGED_IN after it has
    opened a session we could not close.  A private session object (gone
    when the session closes, destroyed at once) is a clean probe.
    """
    try:
        probe = session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.LABEL: "keyd-login-probe",
                Attribute.VALUE: b"",
            }
        )
    except p11.UserNotLoggedIn:
        return False
    probe.destroy()
    return True


def open_logged_in_session(
    token: pkcs11.Token, login_key: tuple[str, int], pin: Secret
) -> pkcs11.Session:
    """A new read/write session of a logged-in application; logs in when needed.

    Wrong PINs are ConfigErrors that name where the PIN came from (never the PIN).
    """
    digest = hashlib.sha256(pin.reveal()).digest()
    with _logins_lock:
        session = token.open(rw=True)
        try:
            current = _logins.get(login_key)
            if logged_in(session):
                # C_Login cannot check a PIN once logged in (it answers
                # CKR_USER_ALREADY_LOGGED_IN whatever the PIN): compare with
                # the PIN that logged this process in.  A token has one user PIN.
                if current and not hmac.compare_digest(current.pin_digest, digest):
                    raise ConfigError(
                        f"pkcs11: the PIN from {pin.source} is wrong for token "
                        f"{token.label!r} (not the PIN this process logged in with)"
                    )
                return session
            try:
                login = token.open(user_pin=pin.reveal().decode())
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as e:
                raise ConfigError(
                    f"pkcs11: the PIN from {pin.source} is wrong for token {token.label!r} "
                    f"({type(e).__name__})"
                ) from e
            except p11.PinLocked as e:
                raise ConfigError(f"pkcs11: the user PIN of token {token.label!r} is locked") from e
            except p11.PinExpired as e:
                raise ConfigError(
                    f"pkcs11: the user PIN of token {token.label!r} has expired; set a new one "
                    "with the token's tools, then update " + pin.source) from e
            except p11.UserPinNotInitialized as e:
                raise ConfigError(
                    f"pkcs11: token {token.label!r} has no user PIN yet; its security officer "
                    "sets one (C_InitPIN, e.g. softhsm2-util --init-pin or the HSM's tools)"
                ) from e
            except p11.PKCS11Error as e:
                # The login itself failed (token busy, removed, out of sessions):
                # whatever it is, it stops start-up as one line, not a traceback.
                raise BackendUnavailable(
                    f"pkcs11: cannot log in to token {token.label!r}: {type(e).__name__}"
                ) from e
            except UnicodeDecodeError as e:
                raise ConfigError(f"pkcs11: the PIN from {pin.source} is not UTF-8") from e
            # The previous login session (if any) died with the login; drop it
            # without closing: closing a logged-in session logs everyone out.
            _logins[login_key] = _Login(session=login, pin_digest=digest)
            return session
        except BaseException:
            _close_quietly(session)
            raise


def _close_quietly(session: pkcs11.Session) -> None:
    try:
        session.close()
    except p11.PKCS11Error:
        pass  # already gone: closing a dead session is what we wanted anyway


@dataclass
class Pooled:
    """A pooled session and the key objects already found in it (by CKA_ID, class)."""

    session: pkcs11.Session
    keys: dict[tuple[bytes, ObjectClass], Any] = field(default_factory=dict)
    epoch: int = 0  # the backend's destroy counter when `keys` was last valid


class _Waiter:
    """A thread waiting for a session: handed one directly, in arrival order."""

    __slots__ = ("event", "handed", "item")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.handed = False
        self.item: Pooled | None = None


class SessionPool:
    """``size`` sessions; each operation borrows one.  Empty slots open lazily.

    Fair: a returned session goes straight to the thread that has waited
    longest.  (A plain queue lets a thread that returns a session take it
    back at once, so under steady load another thread can starve until it
    times out.)
    """

    def __init__(
        self, token: pkcs11.Token, login_key: tuple[str, int], pin: Secret, size: int,
        wait: float = 30.0,
    ) -> None:
        self._token = token
        self._login_key = login_key
        self._pin = pin
        self._wait = wait
        self._lock = threading.Lock()
        self._free: list[Pooled | None] = [None] * size
        self._waiters: deque[_Waiter] = deque()
        self.size = size
        self.closed = False

    def fresh(self) -> Pooled:
        return Pooled(open_logged_in_session(self._token, self._login_key, self._pin))

    def take(self) -> Pooled | None:
        with self._lock:
            if self.closed:
                raise BackendUnavailable("pkcs11: the backend is closed")
            if self._free and not self._waiters:
                return self._free.pop()
            waiter = _Waiter()
            self._waiters.append(waiter)
        if waiter.event.wait(self._wait):
            return waiter.item
        with self._lock:
            if waiter.handed:  # handed over just as the wait ran out
                return waiter.item
            self._waiters.remove(waiter)
        raise BackendUnavailable(
            f"pkcs11: all {self.size} sessions on token {self._token.label!r} "
            f"stayed busy for {self._wait:.0f} s"
        )

    def give_back(self, pooled: Pooled | None) -> None:
        with self._lock:
            if self.closed and pooled is not None:
                _close_quietly(pooled.session)
                pooled = None
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.item, waiter.handed = pooled, True
                waiter.event.set()
                return
            self._free.append(pooled)

    @staticmethod
    def discard(pooled: Pooled) -> None:
        _close_quietly(pooled.session)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            free, self._free = self._free, []
        for pooled in free:
            if pooled is not None:
                _close_quietly(pooled.session)
