"""The service's users: API keys (`--api-keys-file`), their roles and limits, and the key check every client
route runs.

The keys file (YAML or JSON) lists users; no plain key is ever on disk, only its SHA-256:

    users:
      - name: alice
        role: member            # admin | member
        key_sha256: 9f86d0...   # printf %s "$KEY" | sha256sum
        limits: {max_queued_jobs: 10, max_concurrent_jobs: 1, max_data_gb: 20, max_files: 100}
      - name: ops
        role: admin
        key_sha256: ...

`--api-token-file` keeps working: its token is one admin key (user `admin`). Without either, the service
serves loopback only, and every request acts as that one admin.
"""

from __future__ import annotations

import hashlib
import re

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...access import LOCAL_ADMIN, Role, User, UserLimits, enter
from .security import NODE_TOKEN_HEADER, _same_secret

USER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# The principal a request carrying the cluster's node token acts as on client routes (a coordinator reading
# its parts' status, fetching a teacher task's result): the service itself, which sees every job.
NODE_PRINCIPAL = None


class UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: Role = "member"
    key_sha256: str = Field(description="hex SHA-256 of the user's key")
    limits: UserLimits = Field(default_factory=UserLimits)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not USER_NAME.fullmatch(v):
            raise ValueError("1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("key_sha256")
    @classmethod
    def _digest(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("the hex SHA-256 of the key (64 hex digits), never the key itself")
        return v


class UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[UserEntry] = Field(min_length=1)

    def model_post_init(self, _: object) -> None:
        for attr in ("name", "key_sha256"):
            seen: set[str] = set()
            for n, entry in enumerate(self.users):
                if getattr(entry, attr) in seen:
                    raise ValueError(f"users.{n}.{attr}: {'repeated' if attr == 'name' else 'the same key as another user'}")
                seen.add(getattr(entry, attr))


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class UserKeys:
    """Key -> user. Looked up by the key's SHA-256, so the stored digests are all the service needs."""

    def __init__(self, entries: list[UserEntry]):
        self._by_digest = {e.key_sha256: User(e.name, e.role, e.limits) for e in entries}
        self._by_name = {e.name: User(e.name, e.role, e.limits) for e in entries}

    @classmethod
    def single_admin(cls, token: str) -> UserKeys:
        """`--api-token-file`: that token is the key of one admin, `admin`."""
        return cls([UserEntry(name=LOCAL_ADMIN.name, role="admin", key_sha256=key_digest(token))])

    def user_of(self, key: str) -> User | None:
        return self._by_digest.get(key_digest(key))

    def named(self, name: str | None) -> User | None:
        return self._by_name.get(name) if name else None

    def limits_of(self, name: str | None) -> UserLimits | None:
        """The limits of the user named `name` (None: no such user, e.g. the service's own jobs)."""
        user = self.named(name)
        return user.limits if user is not None else None

    def names(self) -> list[str]:
        return sorted(self._by_name)


def read_users_file(path: str) -> list[UserEntry]:
    """`--api-keys-file`: the users (a list, or a mapping with `users:`); a bad file stops start-up with one
    line naming the key."""
    from ...config_file import read_section

    return read_section(path, "--api-keys-file", "users", _UsersList).users


class _UsersList(UsersFile):
    @classmethod
    def model_validate(cls, obj, *args, **kwargs):  # read_section hands over the `users` list itself
        return super().model_validate({"users": obj} if isinstance(obj, list) else obj, *args, **kwargs)


def client_auth(keys: UserKeys | None, node_token: str | None = None, internal_key: str | None = None):
    """A FastAPI dependency: the bearer key names the user the request acts for (for the whole request,
    its streamed answer included). No keys configured: every request acts as the one local admin. A
    request with the cluster's node token (another node of this service), or with `internal_key` (the
    service calling its own routes, e.g. an enhancement's chat calls; made at start, kept in memory only),
    acts as the service itself."""

    async def require_user(request: Request) -> None:  # async: it runs in the request's own context
        user = LOCAL_ADMIN if keys is None else _key_user(request, keys, node_token, internal_key)
        request.state.user = user
        enter(user)

    return require_user


def _key_user(request: Request, keys: UserKeys, node_token: str | None, internal_key: str | None) -> User | None:
    """The user a request's key names; NODE_PRINCIPAL (the service) for the node token or the internal key;
    a 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    if not key:  # the Tinker SDK sends the same key as X-API-Key
        key = request.headers.get("x-api-key", "").strip()
    user = keys.user_of(key) if key else None
    if user is not None:
        return user
    given = request.headers.get(NODE_TOKEN_HEADER)
    if (internal_key is not None and key and _same_secret(key, internal_key)) or (
            node_token is not None and given is not None and _same_secret(given, node_token)):
        return NODE_PRINCIPAL
    if not header and not key:
        raise Unauthenticated("missing API key: send `Authorization: Bearer KEY` (or `X-API-Key: KEY`)",
                              "missing_api_key")
    raise Unauthenticated("wrong API key: not a key of this service (its --api-keys-file or --api-token-file)",
                          "invalid_api_key")


class Unauthenticated(Exception):
    """A 401 whose message every client shows: FastAPI's `detail` for Llama Stack clients, and OpenAI's
    `error.message` for the OpenAI, Tinker and llama-stack-client SDKs, which otherwise print a bare
    `Error code: 401`."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code

    def response(self) -> JSONResponse:
        message = str(self)
        return JSONResponse(status_code=401, headers={"x-should-retry": "false", "www-authenticate": "Bearer"},
                            content={"detail": message, "error": {"message": message, "type": "authentication_error",
                                                                  "param": None, "code": self.code}})


def install_auth_errors(app: FastAPI) -> None:
    """Answer the key check's refusals (`Unauthenticated`) with their own response."""

    async def unauthenticated(_: Request, exc: Unauthenticated) -> JSONResponse:
        return exc.response()

    app.add_exception_handler(Unauthenticated, unauthenticated)


def require_admin(request: Request) -> None:
    """A route dependency after `client_auth`: admins only (a member gets 403)."""
    user = getattr(request.state, "user", None)
    if user is not None and not user.is_admin:
        raise HTTPException(status_code=403, detail="this route is for admins (role: admin in --api-keys-file)")
