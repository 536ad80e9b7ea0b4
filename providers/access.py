"""Who is asking: the user a request acts for, and what that user may see.

Every object a request creates records its owner (the user's name). A request runs as one `User`
(set by the service's key check for the whole request, `acting_as`); reads of owned objects go through
`can_see`, so another user's object is indistinguishable from a missing one. Code that runs outside a
request (the job manager's threads, start-up) acts as nobody and sees everything: it is the service.

Roles, as in OpenAI's projects or Kubernetes namespaces: an `admin` sees and acts on everyone's objects
and the operator routes (/metrics); a `member` only on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

Role = Literal["admin", "member"]


class UserLimits(BaseModel):
    """What one user's work may hold at once: each limit declared here, once, with its bounds. None: only
    the service-wide limit applies."""

    model_config = ConfigDict(extra="forbid")
    max_queued_jobs: PositiveInt | None = None  # jobs waiting to start (beyond: 429)
    max_concurrent_jobs: PositiveInt | None = None  # jobs running at once (the rest wait in the queue)
    max_data_gb: float | None = Field(None, gt=0, allow_inf_nan=False)  # what the user's work writes (507)
    max_files: PositiveInt | None = None  # uploaded files kept (beyond: 429)
    max_sessions: PositiveInt | None = None  # open training sessions (the Tinker API)


@dataclass(frozen=True)
class User:
    name: str
    role: Role = "member"
    limits: UserLimits = field(default_factory=UserLimits)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# The one user of a service started without keys (loopback, or --insecure-no-auth): it owns everything.
LOCAL_ADMIN = User(name="admin", role="admin")

_current: ContextVar[User | None] = ContextVar("providers_current_user", default=None)


def current() -> User | None:
    """The user the running request acts for; None outside a request (the service itself)."""
    return _current.get()


def owner_name() -> str | None:
    """The name to record as the owner of what the running request creates (None: the service's own)."""
    user = _current.get()
    return user.name if user is not None else None


def can_see(owner: str | None) -> bool:
    """Whether the running request may see an object owned by `owner` (None: made before users, or by the
    service itself: admins only)."""
    user = _current.get()
    return user is None or user.is_admin or (owner is not None and owner == user.name)


def enter(user: User | None):
    """Make `user` the current user for the rest of this context (the key check does this once per request;
    each request runs in a context of its own)."""
    return _current.set(user)


@contextmanager
def acting_as(user: User | None) -> Iterator[None]:
    """Run a block as `user` (a background task acting for the user who started it; None: as the service)."""
    token = _current.set(user)
    try:
        yield
    finally:
        _current.reset(token)


def acting_for(owner: str | None):
    """`acting_as` the user named `owner` (work a user's request queued, done later in a background thread:
    what it creates is that user's); None: as the service."""
    return acting_as(User(owner) if owner else None)
