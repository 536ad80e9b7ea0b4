"""What stands between the network and the service: credentials, request limits, the audit log, and
archives that may only ever write plain files inside one fresh directory.

Two credentials, as in Kubernetes (API token vs kubeadm join token) or Ray (job token vs cluster token):
- the API token (`Authorization: Bearer ...`) for clients: every /v1 route;
- the node token (`X-Node-Token: ...`) for nodes: registration, heartbeats, the parts of multi-node jobs
  and teacher outputs a coordinator pushes. A client token never makes a node, and vice versa.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from ... import access
from ...cluster.nodes import host_is  # the node registry checks heartbeats with it too
from ...errors import BadRequest

audit = logging.getLogger("providers.remote_fsdp.audit")


# -- log lines ---------------------------------------------------------------------------------------
def printable(value: object) -> str:
    """`value` as text with every control or non-printable character escaped (`\\n`, `\\x1b`, `\\u2028`):
    a log line built from request data stays one line, so nobody can write a forged line into the log."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class PrintableFormatter(logging.Formatter):
    """Every record as printable text: the message through `printable`, and a traceback's lines each
    escaped and indented, so that no request value inside a log call or an exception starts a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return "\n".join("    " + printable(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + printable(line) for line in stack_info.splitlines())


def install_printable_logs() -> None:
    """Give every handler of the root logger a PrintableFormatter with its current format."""
    for handler in logging.getLogger().handlers:
        current = handler.formatter
        handler.setFormatter(PrintableFormatter(current._fmt if current else None,
                                                current.datefmt if current else None))

NODE_TOKEN_HEADER = "x-node-token"


def _same_secret(given: str, expected: str) -> bool:
    # Bytes, not str: compare_digest refuses non-ASCII str (a 500), and headers may carry any byte.
    return secrets.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def node_auth(node_token: str | None):
    """A FastAPI dependency: the node (join) token. Without one configured, this service takes no nodes."""

    async def require_node(request: Request) -> None:
        if node_token is None:
            raise HTTPException(status_code=403, detail="this service accepts no nodes or job parts: start it "
                                                        "with --node-token-file (the cluster's join token)")
        if not _same_secret(request.headers.get(NODE_TOKEN_HEADER, ""), node_token):
            raise HTTPException(status_code=403, detail=f"missing or wrong node token ({NODE_TOKEN_HEADER})")

    return require_node


def node_headers(api_token: str | None, node_token: str | None) -> dict[str, str]:
    """Headers of a node's calls to another node: both credentials."""
    headers = {}
    if api_token:
        headers["authorization"] = f"Bearer {api_token}"
    if node_token:
        headers[NODE_TOKEN_HEADER] = node_token
    return headers


# -- request limits and the audit log ---------------------------------------------------------------
class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        self.limit = limit


class LimitsAndAudit:
    """ASGI middleware: refuses bodies over the route's limit (413) without reading them, and writes one
    audit line per request (client address, user, method, path and query, status, duration; never headers)."""

    def __init__(self, app, body_limit: int, upload_limit: int, upload_prefixes: tuple[str, ...]):
        self.app = app
        self.body_limit = body_limit
        self.upload_limit = upload_limit
        self.upload_prefixes = upload_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        limit = self.upload_limit if path.startswith(self.upload_prefixes) else self.body_limit
        started = time.monotonic()
        status = {"code": 0}
        client = scope.get("client") or ("-", 0)
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            declared = int(length) if length is not None else 0
        except ValueError:
            declared = 0
        if declared > limit:
            await _send_json(send, 413, f"body: {declared} bytes is over this route's limit of {limit} bytes")
            status["code"] = 413
        else:
            seen = 0
            over = False

            async def limited_receive():
                nonlocal seen, over
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        over = True
                        raise BodyTooLarge(limit)
                return message

            async def tracking_send(message):
                # A body cut short at the limit: whatever the app answers (FastAPI turns any error while it
                # reads a JSON body into a 400) is replaced by the 413 below.
                if over:
                    return
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.app(scope, limited_receive, tracking_send)
            except BodyTooLarge:
                pass
            if over and status["code"] == 0:
                await _send_json(send, 413, f"body: over this route's limit of {limit} bytes")
                status["code"] = 413
        if path not in ("/health", "/metrics"):
            query = scope.get("query_string", b"").decode("latin-1")[:300]
            user = getattr((scope.get("state") or {}).get("user"), "name", "-")  # set by the key check
            audit.info("%s user=%s %s %s%s -> %s in %.0f ms", printable(client[0]), user,
                       printable(scope.get("method")), printable(path), f"?{printable(query)}" if query else "",
                       status["code"], (time.monotonic() - started) * 1000)


async def _send_json(send, code: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"x-should-retry", b"false"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- disk quota ------------------------------------------------------------------------------------
# What the quota counts, under the data dir: uploaded datasets, teacher outputs pushed by a coordinator,
# and what the service downloads or receives as files; with users attached (quota.attach), also the copies jobs
# make of rows and the models made to continue from. Training output (checkpoints) counts per user only.
QUOTA_DIRS = ("datasets", "uploaded_teacher_outputs", "downloads", "files", "openai_ft/models")
PARTIAL_MARKERS = (".part-", ".extract-", ".upload-")
DISK_SCAN_TTL_S = 5.0  # how long a walk of the quota dirs is trusted (a claimed write that lands ends it sooner)


def bytes_under(path: Path) -> int:
    """Bytes of the regular files at or under `path` (never following links; partial files left out: their
    writers' claims count them). A file with several hard links (a continuation model's files and the
    checkpoint they came from) counts its share at each, so that the two together count it once."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size // st.st_nlink if stat.S_ISREG(st.st_mode) else 0
    total, stack = 0, [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            if any(m in e.name for m in PARTIAL_MARKERS):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    total += st.st_size // st.st_nlink
            except OSError:
                continue
    return total


class QuotaExceeded(Exception):
    """Storing more would pass the data dir's quota (--max-data-gb): the service answers 507."""


class DiskQuota:
    """The total bytes uploads and downloads may hold in one data dir (`--max-data-gb`).

    `used()` is what the quota dirs hold on disk (partial files excluded) plus what writers in progress
    have reserved; a writer reserves bytes before it writes them (`reserve`, or a `Reservation` while it
    streams) and releases them when its file is in place (or gone). One instance per data dir: `of(config)`.
    `users` (quota.UserQuotas, set by quota.attach): each claim is also its user's, and the jobs' copies count.
    """

    _instances: dict[Path, DiskQuota] = {}
    _instances_lock = threading.Lock()

    def __init__(self, root: Path, limit_bytes: int, dirs: Iterable[str] = QUOTA_DIRS, flag: str = "--max-data-gb"):
        self.root = Path(root)
        self.limit = int(limit_bytes)
        self.dirs = tuple(dirs)
        self.flag = flag
        self.users = None  # quota.UserQuotas
        self._reserved = 0
        self._lock = threading.Lock()
        self._walked: tuple[float, int] = (-1e18, 0)  # (when, bytes) of the last walk of the quota dirs

    @classmethod
    def of(cls, config) -> DiskQuota:
        """The quota of `config`'s data dir (a ServiceConfig: data_path, max_data_gb), shared by all callers."""
        root = config.data_path
        limit = int(config.max_data_gb * (1 << 30))
        with cls._instances_lock:
            quota = cls._instances.get(root)
            if quota is None or quota.limit != limit:
                quota = cls._instances[root] = cls(root, limit)
            return quota

    def on_disk(self) -> int:
        """Bytes of the regular files in the quota dirs (partial files are counted by their reservations), and
        the jobs' copies when users are attached; a walk is reused for DISK_SCAN_TTL_S."""
        when, walked = self._walked
        if time.monotonic() - when > DISK_SCAN_TTL_S:
            walked = self._walk()
            self._walked = (time.monotonic(), walked)
        return walked + (self.users.data_dir_bytes() if self.users is not None else 0)

    def _walk(self) -> int:
        return sum(bytes_under(self.root / name) for name in self.dirs)

    def used(self) -> int:
        """Bytes on disk in the quota dirs plus bytes reserved by writers in progress."""
        on_disk = self.on_disk()
        with self._lock:
            return on_disk + self._reserved

    def reserve(self, nbytes: int, what: str = "this upload", owner: str | None = None) -> None:
        """Claim `nbytes` more (for the user `owner`, when users are attached), or raise QuotaExceeded naming
        the quota (nothing is claimed then)."""
        on_disk = self.on_disk() if nbytes else 0
        with self._lock:
            if on_disk + self._reserved + nbytes > self.limit:
                raise QuotaExceeded(
                    f"{what}: the data dir's quota for uploads, downloads and jobs' copies of them ({self.flag} = "
                    f"{self.limit / (1 << 30):g} GB, {self.limit} bytes) would be exceeded: "
                    f"{on_disk + self._reserved} bytes are used and {nbytes} more were asked for")
            self._reserved += nbytes
        if self.users is not None:
            try:
                self.users.reserve(owner, nbytes, what)
            except QuotaExceeded:
                self.release(nbytes)
                raise

    def release(self, nbytes: int, owner: str | None = None) -> None:
        """Give back what `reserve` claimed (once the file is in place, the disk counts it: the next claim walks
        the dirs again)."""
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)
            self._walked = (-1e18, 0)
        if self.users is not None:
            self.users.release(owner, nbytes)

    def reservation(self, what: str = "this upload", step: int = 64 << 20) -> Reservation:
        """A context manager for one streamed write: `add(n)` before writing n bytes."""
        return Reservation(self, what, step)


class Reservation:
    """Bytes one writer claims as it streams, in steps (so the disk is scanned once per step, not per
    chunk); everything it claimed is released when the `with` block ends."""

    def __init__(self, quota: DiskQuota, what: str, step: int):
        self.quota, self.what, self.step = quota, what, step
        self.owner = access.owner_name()  # whose quota it claims from: the user whose request writes
        self.claimed = self.written = 0

    def add(self, nbytes: int) -> None:
        """Count `nbytes` about to be written; raises QuotaExceeded when the quota cannot hold them."""
        self.written += nbytes
        if self.written > self.claimed:
            more = max(self.written - self.claimed, min(self.step, max(0, self.quota.limit // 64)))
            try:
                self.quota.reserve(more, self.what, self.owner)
            except QuotaExceeded:
                more = self.written - self.claimed  # the last step may be too large: ask for what is needed
                self.quota.reserve(more, self.what, self.owner)
            self.claimed += more

    def expect(self, nbytes: int) -> None:
        """Claim a declared size (a Content-Length) up front, so a body that cannot fit is refused unread."""
        if nbytes > self.claimed:
            self.quota.reserve(nbytes - self.claimed, self.what, self.owner)
            self.claimed = nbytes

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.quota.release(self.claimed, self.owner)
        self.claimed = 0


# -- archives ---------------------------------------------------------------------------------------
class ArchiveError(ValueError):
    pass


def extract_archive(archive: Path, dest: Path, max_bytes: int, max_members: int,
                    reservation: Reservation | None = None) -> None:
    """Extract a tar(.gz) into `dest`, which must not exist yet: only regular files and directories, with
    relative names and no '..', at most `max_members` entries and `max_bytes` in all (each file's bytes
    claimed from `reservation`, a disk quota's, before they are written). Everything lands in a fresh
    temporary directory beside `dest` first and is renamed into place, so a refused archive leaves
    nothing behind. No tarfile extraction filter is relied on (they have had bypasses)."""
    if dest.exists():
        raise ArchiveError(f"{dest.name} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        total = members = 0
        try:
            tar = tarfile.open(archive, mode="r:*")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ArchiveError(f"not a tar archive: {e}") from None
        with tar:
            try:
                for member in tar:
                    members += 1
                    if members > max_members:
                        raise ArchiveError(f"more than {max_members} entries")
                    name = member.name
                    parts = Path(name).parts
                    if (not name or name.startswith(("/", "\\")) or "\x00" in name or ".." in parts
                            or any(p.startswith("/") for p in parts)):
                        raise ArchiveError(f"entry {name[:200]!r}: only relative names without '..'")
                    target = staging.joinpath(*[p for p in parts if p != "."]) if parts else staging
                    if target != staging and staging not in target.parents:
                        raise ArchiveError(f"entry {name[:200]!r} points outside the archive's directory")
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True, mode=0o755)
                        continue
                    if not member.isreg():
                        raise ArchiveError(f"entry {name[:200]!r}: only regular files and directories are "
                                           "accepted (no links, devices or fifos)")
                    total += member.size
                    if total > max_bytes:
                        raise ArchiveError(f"extracts to more than {max_bytes} bytes")
                    if reservation is not None:
                        reservation.add(member.size)
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                    # A path component that is a file already (a name repeated as a directory) fails here.
                    source = tar.extractfile(member)
                    written = 0
                    with open(target, "xb") as out:  # "x": never follow or overwrite anything
                        while chunk := source.read(1 << 20):
                            written += len(chunk)
                            if written > member.size:
                                raise ArchiveError(f"entry {name[:200]!r} is larger than its header says")
                            out.write(chunk)
                    os.chmod(target, 0o644)
            except (tarfile.TarError, EOFError, OSError, UnicodeError) as e:
                raise ArchiveError(f"archive cannot be read: {type(e).__name__}: {e}") from None
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_archive(path: Path, archive: Path) -> None:
    """`path`'s regular files as a tar.gz written to `archive` (on disk: any size; never links)."""
    with tarfile.open(archive, mode="w:gz") as tar:
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.is_symlink():
                tar.add(f, arcname=str(f.relative_to(path)), recursive=False)


def temp_path(directory: Path, stem: str) -> Path:
    """A unique temporary file name in `directory` (cleaned up by whoever made it, and at start-up)."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f".{stem}.part-{uuid.uuid4().hex}"


def clean_partial_files(directory: Path) -> None:
    """Remove what interrupted uploads and extractions left behind (names from `temp_path`/extract)."""
    if not directory.is_dir():
        return
    for p in directory.glob(".*"):
        if ".part-" in p.name or ".extract-" in p.name or ".upload-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# -- node URLs ---------------------------------------------------------------------------------------
def check_node_url(url: str, peer: str | None) -> str:
    """A node's advertised URL: plain http(s)://HOST:PORT, no credentials, path, query or fragment, and
    HOST must be the address the registration came from (so nobody can point the coordinator at a third
    machine). Returns the normalized URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadRequest(f"url: {url[:200]!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise BadRequest(f"url: {url[:200]!r} must be http(s)://HOST:PORT")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise BadRequest(f"url: {url[:200]!r} must be http(s)://HOST:PORT, with no credentials, path or query")
    if peer is not None and not host_is(parts.hostname, peer):
        raise BadRequest(f"url: host {parts.hostname!r} is not the address this registration came from ({peer})")
    return f"{parts.scheme}://{parts.netloc}"
