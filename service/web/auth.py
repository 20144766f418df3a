"""Local users, API tokens, signed sessions, CSRF and login throttling.

Domain layer: raises :class:`AuthError` subclasses, never ``HTTPException`` (the dependencies
in ``service.web.deps`` translate). What a caller must know:

* Passwords are hashed with argon2id (argon2-cffi defaults); a hash made with older
  parameters is upgraded at the next successful login.
* API tokens are 32 random bytes (URL-safe base64, prefixed ``ct_``); only their SHA-256 is
  stored, so a database dump gives no usable token. Revoked or expired tokens, and tokens of a
  disabled user, authenticate nobody.
* The session cookie is signed (itsdangerous, keyed by ``secret_key``) and carries the user
  id, a random session id and a fingerprint of the password hash: changing a password or
  disabling the user ends every session of that user at its next request.
* CSRF tokens are an HMAC of the session id: a form or a ``fetch`` must send the one the page
  was rendered with.
* Login throttling reads the audit trail itself (``auth.login`` events with outcome
  ``failure``), so it holds across web processes and restarts without a table of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.audit import record
from service.config import Settings
from service.db.tables import ApiToken, AuditEvent, Role, User
from service.db.types import utcnow

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "ct_"
SESSION_COOKIE = "triage_session"
LOGIN_COOKIE = "triage_login"
"""Pre-session nonce for the login form's CSRF token (the form has no session yet)."""
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
LOGIN_EVENT = "auth.login"
MIN_PASSWORD_LENGTH = 8

_hasher = PasswordHasher()
# Verified against when the user does not exist, so a miss costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not-a-password-of-anyone")


class AuthError(Exception):
    """Authentication or authorisation failed; ``reason`` is a stable code for the audit."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


class LoginThrottled(AuthError):
    """Too many failures: the account is locked, or the address is rate limited."""


class UserError(ValueError):
    """A user-management request that cannot be done (unknown user, weak password...)."""


@dataclass(frozen=True)
class Actor:
    """Who is calling: a logged-in user (session) or a machine client (API token)."""

    user_id: int
    username: str
    role: Role
    via: str
    """``session`` or ``token``."""
    session_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN


# --- passwords and users -------------------------------------------------------------------


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def parse_role(value: str) -> Role:
    try:
        return Role(value.upper())
    except ValueError as exc:
        raise UserError(f"unknown role {value!r}: radiologist or admin") from exc


def create_user(session: Session, username: str, password: str, role: Role, *,
                actor: str | None = None) -> User:
    username = username.strip()
    if not username or len(username) > 64:
        raise UserError("username must have 1 to 64 characters")
    if session.execute(select(User.id).where(User.username == username)).first():
        raise UserError(f"user {username!r} exists")
    user = User(username=username, password_hash=hash_password(password), role=role,
                active=True, created_at=utcnow())
    session.add(user)
    session.flush()
    record(session, "user.add", actor=actor, details={"username": username, "role": role.value})
    return user


def get_user(session: Session, username: str) -> User:
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise UserError(f"no user {username!r}")
    return user


def set_password(session: Session, username: str, password: str, *,
                 actor: str | None = None) -> None:
    user = get_user(session, username)
    user.password_hash = hash_password(password)
    user.active = True
    record(session, "user.passwd", actor=actor, details={"username": username})


def disable_user(session: Session, username: str, *, actor: str | None = None) -> None:
    user = get_user(session, username)
    user.active = False
    revoked = 0
    for token in session.execute(select(ApiToken).where(ApiToken.user_id == user.id,
                                                        ApiToken.revoked_at.is_(None))).scalars():
        token.revoked_at = utcnow()
        revoked += 1
    record(session, "user.disable", actor=actor,
           details={"username": username, "tokens_revoked": revoked})


# --- login with throttling -----------------------------------------------------------------


def _failures_since(session: Session, since: datetime, *, username: str | None = None,
                    source_ip: str | None = None) -> list[datetime]:
    query = select(AuditEvent.occurred_at).where(AuditEvent.event_type == LOGIN_EVENT,
                                                 AuditEvent.outcome == "failure",
                                                 AuditEvent.occurred_at >= since)
    if username is not None:
        query = query.where(AuditEvent.actor == username)
    if source_ip is not None:
        query = query.where(AuditEvent.source_ip == source_ip)
    return list(session.execute(query).scalars())


def _last_success(session: Session, username: str) -> datetime | None:
    value: datetime | None = session.execute(
        select(func.max(AuditEvent.occurred_at)).where(
            AuditEvent.event_type == LOGIN_EVENT, AuditEvent.outcome == "success",
            AuditEvent.actor == username)).scalar_one_or_none()
    return value


def check_throttle(session: Session, settings: Settings, username: str,
                   source_ip: str | None, now: datetime | None = None) -> None:
    """Raise :class:`LoginThrottled` when this address or this account may not try now.

    An account is locked once ``login_max_failures`` attempts failed within
    ``login_window_s`` with no success after them; it unlocks ``login_lockout_s`` after the
    last of those failures. An address is refused after ``login_ip_max_failures`` failures
    within the window, whatever the user names it tried.
    """
    now = now or utcnow()
    window_start = now - timedelta(seconds=settings.login_window_s)
    if source_ip is not None:
        by_ip = _failures_since(session, window_start, source_ip=source_ip)
        if len(by_ip) >= settings.login_ip_max_failures:
            raise LoginThrottled("rate_limited", "too many failed logins from this address")
    success = _last_success(session, username)
    since = max(window_start, success) if success is not None else window_start
    by_user = _failures_since(session, since, username=username)
    if (len(by_user) >= settings.login_max_failures
            and now - max(by_user) < timedelta(seconds=settings.login_lockout_s)):
        raise LoginThrottled("locked", "account locked after repeated failed logins")


def authenticate(session: Session, settings: Settings, username: str, password: str,
                 source_ip: str | None) -> User:
    """Check a login attempt and audit it (in the caller's transaction, which must commit
    whatever happens: a failed attempt is recorded too)."""
    username = username.strip()[:64]
    try:
        check_throttle(session, settings, username, source_ip)
        user = session.execute(select(User).where(User.username == username)
                               ).scalar_one_or_none()
        if user is None:
            _verify(_DUMMY_HASH, password)
            raise AuthError("bad_credentials", "wrong user name or password")
        if not _verify(user.password_hash, password):
            raise AuthError("bad_credentials", "wrong user name or password")
        if not user.active:
            raise AuthError("disabled", "wrong user name or password")
    except AuthError as exc:
        record(session, LOGIN_EVENT, outcome="failure", actor=username or None,
               source_ip=source_ip, details={"reason": exc.reason})
        raise
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    user.last_login_at = utcnow()
    record(session, LOGIN_EVENT, actor=username, source_ip=source_ip,
           details={"role": user.role.value})
    return user


# --- sessions and CSRF ---------------------------------------------------------------------


def _password_fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


class SessionCodec:
    """Signs and reads the session cookie; expiry is checked on the signature's timestamp."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.secret_key.get_secret_value()
        self._serializer = URLSafeTimedSerializer(self._secret, salt="triage-session")
        self._login_serializer = URLSafeTimedSerializer(self._secret, salt="triage-login")
        self.max_age_s = settings.session_max_age_s

    def issue(self, user: User) -> tuple[str, str]:
        """A new session for ``user``: (cookie value, session id)."""
        session_id = secrets.token_urlsafe(18)
        value = self._serializer.dumps({"uid": user.id, "sid": session_id,
                                        "pwf": _password_fingerprint(user.password_hash)})
        return value, session_id

    def read(self, value: str) -> dict[str, Any] | None:
        try:
            data = self._serializer.loads(value, max_age=self.max_age_s)
        except BadSignature:
            return None
        return data if isinstance(data, dict) else None

    def csrf_token(self, session_id: str) -> str:
        return hmac.new(self._secret.encode(), f"csrf:{session_id}".encode(),
                        hashlib.sha256).hexdigest()

    def check_csrf(self, session_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session_id), token or "")

    def login_nonce(self) -> tuple[str, str]:
        """(cookie value, nonce) for the login form, valid for an hour."""
        nonce = secrets.token_urlsafe(18)
        return self._login_serializer.dumps(nonce), nonce

    def read_login_nonce(self, value: str | None) -> str | None:
        if not value:
            return None
        try:
            nonce = self._login_serializer.loads(value, max_age=3600)
        except BadSignature:
            return None
        return nonce if isinstance(nonce, str) else None


def actor_from_session(session: Session, data: dict[str, Any]) -> Actor | None:
    """The user a session cookie names, if it is still valid (active, same password)."""
    user = session.get(User, data.get("uid")) if isinstance(data.get("uid"), int) else None
    if user is None or not user.active:
        return None
    if not hmac.compare_digest(str(data.get("pwf", "")),
                               _password_fingerprint(user.password_hash)):
        return None
    return Actor(user_id=user.id, username=user.username, role=user.role, via="session",
                 session_id=str(data.get("sid")))


# --- API tokens ----------------------------------------------------------------------------


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, username: str, *, name: str | None = None,
                 expires_at: datetime | None = None, actor: str | None = None
                 ) -> tuple[ApiToken, str]:
    """A new token for ``username``: the row and the token itself (shown once, never stored)."""
    user = get_user(session, username)
    if not user.active:
        raise UserError(f"user {username!r} is disabled")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name, token_hash=_token_digest(token),
                   prefix=token[:10], created_at=utcnow(), expires_at=expires_at)
    session.add(row)
    session.flush()
    record(session, "auth.token_created", actor=actor or username,
           details={"token_id": row.id, "username": username, "name": name})
    return row, token


def revoke_token(session: Session, token_id: int, *, actor: str | None = None) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise UserError(f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record(session, "auth.token_revoked", actor=actor, details={"token_id": token_id})
    return row


def actor_from_token(session: Session, token: str) -> Actor | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = session.execute(select(ApiToken).where(ApiToken.token_hash == _token_digest(token))
                          ).scalar_one_or_none()
    now = utcnow()
    if row is None or row.revoked_at is not None or (row.expires_at and row.expires_at <= now):
        return None
    user = session.get(User, row.user_id)
    if user is None or not user.active:
        return None
    # Coarse last-use stamp: at most one write a minute per token.
    if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
        row.last_used_at = now
        session.commit()
    return Actor(user_id=user.id, username=user.username, role=user.role, via="token")
