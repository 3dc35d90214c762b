"""Request bodies under a byte limit, whatever the transfer encoding: bytes are counted as they arrive and reading
stops at the first byte over the limit (413), so a chunked upload with no Content-Length cannot get around it.
Multipart bodies (/v1/images/edits) are parsed from the bytes read, with python-multipart (what starlette uses),
and their text fields decoded as strict UTF-8: a field that is not is refused naming it, not stored as mojibake."""

from __future__ import annotations

import json
from dataclasses import dataclass

from python_multipart.multipart import FormParserError, MultipartParser, parse_options_header
from starlette.requests import Request

from .openai_request import TEXT_FIELDS, APIError, form_value

MAX_PARTS = 64


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or APIError 413 as soon as more than `limit` bytes have come (a declared Content-Length
    over it is refused before reading). A client that goes away raises starlette's ClientDisconnect."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "could not parse the body as JSON", code="invalid_json") from None


@dataclass
class Part:
    name: bytes
    filename: bytes | None
    data: bytearray


def _parts(raw: bytes, content_type: str) -> list[Part]:
    """multipart/form-data → its parts, in order; APIError 400 for anything malformed."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "the multipart body has no boundary in its Content-Type", code="invalid_multipart")
    parts: list[Part] = []
    header = {"name": b"", "value": b"", "disposition": b""}

    def on_header_end():
        if header["name"].lower() == b"content-disposition":
            header["disposition"] = header["value"]
        header["name"] = header["value"] = b""

    def on_headers_finished():
        _, options = parse_options_header(header["disposition"])
        if b"name" not in options:
            raise APIError(400, "a multipart part has no name in its Content-Disposition", code="invalid_multipart")
        if len(parts) >= MAX_PARTS:
            raise APIError(400, f"more than {MAX_PARTS} multipart parts", code="invalid_multipart")
        parts.append(Part(options[b"name"], options.get(b"filename"), bytearray()))
        header["disposition"] = b""

    callbacks = {
        "on_header_field": lambda d, s, e: header.__setitem__("name", header["name"] + d[s:e]),
        "on_header_value": lambda d, s, e: header.__setitem__("value", header["value"] + d[s:e]),
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": lambda d, s, e: parts[-1].data.extend(d[s:e]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(raw)
        parser.finalize()
    except FormParserError as e:
        raise APIError(400, f"could not read the multipart body ({e})", code="invalid_multipart") from None
    return parts


def _text(data: bytes, param: str | None) -> str:
    """Strict UTF-8 (param: the field it is the value of; None for a field name)."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        what = f"'{param}'" if param else "a multipart field name"
        raise APIError(400, f"{what} is not valid UTF-8 (byte offset {e.start}); send text fields as UTF-8",
                       param=param, code="invalid_value") from None


def parse_form(raw: bytes, content_type: str) -> tuple[dict, dict[str, bytes]]:
    """A multipart body → (the text fields as a JSON body would carry them, {field: file bytes}). The array form
    `image[]` of the SDKs counts as `image`; a repeated text field keeps its last value, a repeated file its first."""
    body, uploads = {}, {}
    for part in _parts(raw, content_type):
        name = _text(part.name, None).removesuffix("[]")
        if part.filename is not None:
            uploads.setdefault(name, bytes(part.data))
        else:
            value = _text(part.data, name)
            body[name] = value if name in TEXT_FIELDS else form_value(value)
    return body, uploads
