"""The CLI's exit codes and one-line errors, in one place: every command's exceptions end in `run_app`,
which prints one line on stderr (no traceback) and exits with the code of the outcome."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

EXIT_OK = 0  # done; or accepted (a task submitted without waiting)
EXIT_FAILED = 1  # the job / task failed (validation: not passed); the server unreachable or its own error (5xx)
EXIT_USAGE = 2  # bad arguments or job file, or the server refused the request (4xx other than 404)
EXIT_CANCELLED = 3  # the job / task was cancelled
EXIT_NOT_FOUND = 4  # no such job, task, pipeline or dataset (404)

EXIT_CODES_HELP = ("Exit codes: 0 ok / accepted, 1 failed (job, task or validation; server unreachable or "
                   "5xx), 2 usage error or a 4xx refusal, 3 cancelled, 4 not found.")

STATE_CODES = {"completed": EXIT_OK, "scheduled": EXIT_OK, "in_progress": EXIT_OK, "failed": EXIT_FAILED,
               "cancelled": EXIT_CANCELLED}
REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           413: "Payload Too Large", 422: "Unprocessable", 429: "Too Many Requests", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Unavailable", 507: "Insufficient Storage"}


class CliError(Exception):
    """A failure to show the user as one line; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def code_for_status(status: int) -> int:
    """An HTTP error status -> exit code: 404 not found, other 4xx usage, 5xx failed."""
    if status == 404:
        return EXIT_NOT_FOUND
    return EXIT_USAGE if 400 <= status < 500 else EXIT_FAILED


def detail_text(detail: Any) -> str:
    """The service's `detail` (a string, or [{"field", "reason"}]) as 'field: reason; ...'."""
    if isinstance(detail, list):
        detail = "; ".join(f"{d.get('field')}: {d.get('reason')}" if isinstance(d, dict) else str(d) for d in detail)
    elif isinstance(detail, dict):
        detail = json.dumps(detail)
    return str(detail)


def body_detail(text: str) -> str:
    """An error response's body -> its detail text (JSON `detail`, OpenAI's `error.message`, or the text)."""
    try:
        body = json.loads(text)
    except ValueError:
        return text
    if isinstance(body, dict):
        if "detail" in body:
            return detail_text(body["detail"])
        if isinstance(body.get("error"), dict) and "message" in body["error"]:
            return str(body["error"]["message"])
    return text


def http_error(status: int, detail: Any, where: str = "") -> CliError:
    """The one line for an HTTP error answer: 'HTTP 400 Bad Request (POST /v1/x): field: reason'."""
    text = detail_text(detail) if not isinstance(detail, str) else detail
    head = f"HTTP {status} {REASONS.get(status, '')}".rstrip() + (f" ({where})" if where else "")
    return CliError(f"{head}: {text}", code_for_status(status))


def one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(exc: BaseException) -> tuple[int, str]:
    """Any exception a command raised -> (exit code, the line to print)."""
    from pydantic import ValidationError

    from ..errors import first_validation_error
    from ..remote_fsdp.workflow_client import ServiceError
    from .jobfile import JobFileError

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, ServiceError):
        e = http_error(exc.status, body_detail(exc.text), f"{exc.method} {exc.path}")
        return e.code, str(e)
    if isinstance(exc, JobFileError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ValidationError):
        return EXIT_USAGE, first_validation_error(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return EXIT_USAGE, f"{exc.filename}: {exc.strerror}" if exc.strerror else str(exc)
    if isinstance(exc, ValueError) or type(exc).__module__.startswith("yaml"):  # unreadable JSON/YAML, a bad value
        return EXIT_USAGE, f"{type(exc).__name__}: {exc}"
    if _is_connection_error(exc):
        return EXIT_FAILED, f"cannot reach the server: {type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return EXIT_FAILED, f"timed out: {exc}"
    return EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc} (TRL_CLI_DEBUG=1 shows the traceback)"


def _is_connection_error(exc: BaseException) -> bool:
    import httpx
    import requests

    return isinstance(exc, (httpx.HTTPError, requests.ConnectionError, requests.Timeout, ConnectionError))


def run_app(app) -> None:
    """Run a typer app as a console script: click's own usage errors exit 2 as usual; anything a command
    raises is one line on stderr and the exit code of `describe`."""
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - every command's errors end here, by design
        if os.environ.get("TRL_CLI_DEBUG"):
            raise
        code, line = describe(exc)
        print(f"error: {one_line(line)}", file=sys.stderr, flush=True)
        sys.exit(code)
