"""Reading one uploaded file out of a ``multipart/form-data`` request, with a byte limit kept while streaming.

FastAPI's ``UploadFile`` parses the whole body (spooling big files to disk) before the route runs, so a limit
checked there comes after the bytes were received and stored. Here the body is fed chunk by chunk to
python-multipart's streaming parser: the wanted field is kept in memory, and the request is refused (413)
the moment it grows past the limit, before the rest is read. A ``Content-Length`` that already says too much
is refused before reading anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Mapping

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

# Room for the multipart framing (boundaries, part headers) and small extra fields around the file.
FORM_OVERHEAD = 64 * 1024


class UploadError(Exception):
    """A request whose upload cannot be used: an HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    """The uploaded file: its name as the client gave it, its declared content type, and its bytes."""

    filename: str
    content_type: str
    data: bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def check_request(headers: Mapping[str, str], max_bytes: int) -> bytes:
    """The multipart boundary of a request, once its headers allow it; raises :class:`UploadError` (415 not
    multipart, 400 no boundary, 413 a ``Content-Length`` over the limit) before any of the body is read."""
    kind, options = parse_options_header(headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise UploadError(415, f"send the file as multipart/form-data in the field 'file' (got content type {shown})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "malformed multipart request: no boundary in the Content-Type header")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD:
        raise UploadError(413, f"upload too large ({_mib(int(length))}; the limit is {_mib(max_bytes)})")
    return boundary


async def read_upload(headers: Mapping[str, str], chunks: AsyncIterator[bytes], max_bytes: int,
                      field: str = "file") -> Upload:
    """The first file of the form field ``field``, read from the body ``chunks`` with at most ``max_bytes`` kept.

    Raises :class:`UploadError`: 415 (not multipart), 400 (malformed), 413 (the file, or the whole body, is
    larger than allowed; raised as soon as the stream shows it), 422 (no field ``field``).
    """
    boundary = check_request(headers, max_bytes)
    state = _Parts(field, max_bytes)
    try:
        parser = MultipartParser(boundary, state.callbacks())
    except (ValueError, MultipartParseError) as e:
        raise UploadError(400, f"malformed multipart request ({e})") from None
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > max_bytes + FORM_OVERHEAD:
            raise UploadError(413, f"upload too large (more than {_mib(max_bytes)}, the limit)")
        try:
            parser.write(chunk)
        except MultipartParseError as e:
            raise UploadError(400, f"malformed multipart request ({e})") from None
    if not state.finished:
        raise UploadError(400, "malformed multipart request: the body ends before its closing boundary")
    if state.upload is None:
        raise UploadError(422, f"missing multipart field '{field}' (the file to score)")
    return state.upload


class _Parts:
    """python-multipart callbacks that keep the first part named ``field`` and count the bytes of each part."""

    def __init__(self, field: str, max_bytes: int):
        self.field, self.max_bytes = field, max_bytes
        self.upload: Upload | None = None
        self.finished = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._data: bytearray | None = None  # the wanted part's bytes while it is being read

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_val, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers, self._data = {}, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if self.upload is None and options.get(b"name", b"").decode("utf-8", "replace") == self.field:
            self._data = bytearray()
            self._filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self._content_type = self._headers.get(b"content-type", b"").decode("latin-1").strip()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is None:
            return  # another field: counted against the body's limit by read_upload, not kept
        if len(self._data) + (end - start) > self.max_bytes:
            raise UploadError(413, f"file too large (more than {_mib(self.max_bytes)}, the limit)")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._data is not None:
            self.upload = Upload(self._filename, self._content_type, bytes(self._data))
            self._data = None

    def _end(self) -> None:
        self.finished = True
