"""Errors that are the client's: each becomes its HTTP status at the service's edge.

Code that validates what a client sent raises one of these (naming the field, the value and what is
accepted). Anything else that escapes a route is the service's own fault: a 500 with an error id that the
service's log repeats beside the traceback, never a 4xx that blames the client.

They subclass ValueError so that callers that already treat bad values alike (the CLI, the inline provider,
`except ValueError` around a parse) keep working. The training core (`providers/training/`) knows nothing of
HTTP and raises plain ValueError; the request layer turns those into client errors where it calls the core to
validate a request (`client_errors`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ClientError(ValueError):
    """A request the service refuses; `status` is the HTTP status it becomes."""

    status = 400


class BadRequest(ClientError):
    status = 400


class NotFound(ClientError):
    status = 404


class Conflict(ClientError):
    status = 409


def first_validation_error(e, prefix: str = "") -> str:
    """A pydantic ValidationError as one line naming the field: `PREFIX.loc.path: message`."""
    from .training.keys import error_loc

    first = e.errors()[0]
    loc = ".".join(str(p) for p in error_loc(first))
    field = ".".join(p for p in (prefix, loc) if p)
    message = first["msg"].removeprefix("Value error, ")  # a validator's own message names its fields
    return f"{field}: {message}" if field else message


@contextmanager
def client_errors(prefix: str = "") -> Iterator[None]:
    """Inside: a ValueError (a pydantic ValidationError included) raised while validating a request is the
    client's. Wrap calls into the training core's checks with it, never whole handlers."""
    from pydantic import ValidationError

    try:
        yield
    except ClientError:
        raise
    except ValidationError as e:
        raise BadRequest(first_validation_error(e, prefix)) from None
    except ValueError as e:
        raise BadRequest(f"{prefix}: {e}" if prefix else str(e)) from None
