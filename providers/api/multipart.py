"""multipart/form-data bodies, streamed through python-multipart: one file part to disk (each chunk claimed from the
disk quota first), the other fields kept in memory within FORM_LIMITS. Every multipart route reads its body here.

A body that is not well-formed multipart (a part header over the parser's limit, too many part headers, no
leading or closing boundary) is a 400 naming `body`; fields past FORM_LIMITS are a 413 naming the limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from ..errors import BadRequest, ClientError


@dataclass(frozen=True)
class FormLimits:
    """What a multipart body's fields (its parts other than the file) may hold, all kept in memory."""

    fields: int = 16  # parts other than the file, named or not
    field_bytes: int = 4096  # one field's value
    total_bytes: int = 16384  # all fields' values together


FORM_LIMITS = FormLimits()


class FormTooLarge(ClientError):
    status = 413


class _Form:
    """The parser's callbacks: the `file_field` part to `dest`, the other fields to `fields`."""

    def __init__(self, file_field: str, dest: Path, quota, limits: FormLimits):
        self.file_field, self.dest, self.quota, self.limits = file_field, dest, quota, limits
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_parts = 0
        self.field_parts = 0
        self.field_bytes = 0
        self._out = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._value = bytearray()
        self._name: str | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
                "on_header_field": self._hfield, "on_header_value": self._hvalue, "on_header_end": self._hend,
                "on_headers_finished": self._headers_done}

    def _begin(self):
        self._headers, self._value, self._name = {}, bytearray(), None

    def _hfield(self, data, start, end):
        self._header_field += data[start:end]

    def _hvalue(self, data, start, end):
        self._header_value += data[start:end]

    def _hend(self):
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_done(self):
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field:
            self.file_parts += 1
            if self.file_parts > 1:
                raise BadRequest(f"{self.file_field}: more than one file part; upload one file per request")
            self.filename = params.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")[:255]
            self._out = open(self.dest, "wb")
            return
        self.field_parts += 1
        if self.field_parts > self.limits.fields:
            raise FormTooLarge(f"body: more than {self.limits.fields} form fields besides `{self.file_field}`")

    def _data(self, data, start, end):
        if self._name == self.file_field:
            self.quota.add(end - start)
            self._out.write(data[start:end])
            return
        self._value += data[start:end]
        self.field_bytes += end - start
        if len(self._value) > self.limits.field_bytes:
            raise FormTooLarge(f"{self._name[:100]}: a form field of more than {self.limits.field_bytes} bytes")
        if self.field_bytes > self.limits.total_bytes:
            raise FormTooLarge(f"body: form fields of more than {self.limits.total_bytes} bytes in all")

    def _end(self):
        if self._name == self.file_field:
            self._out.close()
            self._out = None
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self):
        if self._out is not None:
            self._out.close()


async def read_multipart(request: Request, file_field: str, dest: Path, quota,
                         limits: FormLimits = FORM_LIMITS) -> _Form:
    """Stream a multipart/form-data body: the part named `file_field` to `dest` (required, one), the other
    fields returned in `.fields` (within `limits`). `quota`: `.add(nbytes)` before each chunk is written."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise BadRequest(f"body: must be multipart/form-data with a `{file_field}` part")
    form = _Form(file_field, dest, quota, limits)
    try:
        parser = MultipartParser(params[b"boundary"], form.callbacks())
        async for chunk in request.stream():
            if parser.state != MultipartState.END:  # past the closing boundary: an epilogue, dropped
                parser.write(chunk)
    except FormParserError as e:
        raise BadRequest(f"body: not well-formed multipart/form-data ({e})") from None
    finally:
        form.close()
    if parser.state != MultipartState.END:
        raise BadRequest("body: ends before the closing multipart boundary (a cut-off upload)")
    if form.file_parts == 0:
        raise BadRequest(f"{file_field}: missing (a multipart part named `{file_field}`)")
    return form
