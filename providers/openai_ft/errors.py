"""OpenAI's error shape for the files and fine-tuning API: `{"error": {"message", "type", "param", "code"}}`,
and the service's own errors (client errors, a full queue, a quota, a bad file) turned into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..errors import ClientError, first_validation_error
from ..jobs.manager import QueueFullError
from ..jobs.store import UnknownJobError
from ..remote_fsdp.service.security import QuotaExceeded
from .formats import FileFormatError
from .store import TooManyFiles

RETRY_AFTER_S = 30  # a 429's Retry-After: about how long a queued job takes to leave the queue


class ApiError(ClientError):
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 409: "conflict_error",
                429: "rate_limit_error", 507: "insufficient_storage"}.get(self.status, "invalid_request_error")
        # A full queue is worth retrying later (the SDK waits Retry-After); nothing else is (a 429 for too
        # many files stays one until files are deleted).
        retry = self.status == 429 and self.code == "rate_limit_exceeded"
        headers = {"retry-after": str(RETRY_AFTER_S)} if retry else {"x-should-retry": "false"}
        return JSONResponse(status_code=self.status, headers=headers, content={
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}})


@contextmanager
def openai_errors(param: str | None = None) -> Iterator[None]:
    """Inside: the service's client errors (and a full queue, a full disk) as OpenAI errors."""
    try:
        yield
    except ApiError:
        raise
    except FileFormatError as e:
        raise ApiError(400, str(e), param or e.field, "invalid_file_format") from None
    except TooManyFiles as e:
        raise ApiError(429, str(e), "file", "file_limit_reached") from None
    except ClientError as e:
        raise ApiError(e.status, str(e), param) from None
    except ValidationError as e:
        raise ApiError(400, first_validation_error(e), param) from None
    except QueueFullError as e:
        raise ApiError(429, str(e), None, "rate_limit_exceeded") from None
    except QuotaExceeded as e:
        raise ApiError(507, str(e), "file", "quota_exceeded") from None
    except UnknownJobError as e:
        raise ApiError(404, f"fine_tuning_job_id: {e}", "fine_tuning_job_id") from None
