"""The OpenAI-compatible HTTP API over one loaded :class:`~nextgpt.generate.Generator`.

Endpoints:

- ``POST /v1/chat/completions``: text plus images, audio and video in (see
  :mod:`nextgpt.serve.protocol`), text plus generated media out; ``stream: true`` sends
  server-sent events of ``chat.completion.chunk`` objects, then ``data: [DONE]``.
- ``GET /v1/files/{request}/{name}``: a generated media file, served only when its real path
  (symlinks resolved) is in that request's folder under ``out``; otherwise 404, as unknown.
- ``GET /v1/models``, ``GET /health``.

Generated media come back in ``choices[0].message.media`` (in the last chunk's ``delta.media``
when streaming): a list of ``{"type": "image", "mime_type": "image/png", "url": ...}``, or with
``"b64_json"`` instead of ``"url"`` when the request says ``"media_format": "b64_json"`` (the
OpenAI client passes it with ``extra_body``). The answer's text keeps a placeholder (``<image>``)
where each medium was generated.

One model, one worker thread: requests run one at a time in arrival order, so two requests can
never mix their tokens or media; at most ``max_queue`` wait, the next gets 429. Every error is an
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status when the request
is at fault; an internal error is a 500 whose message names the exception type, never a traceback
(the traceback goes to the server log). A request body is bounded before it is parsed: over the
size limit is 413 (from ``Content-Length``, or counted while reading), JSON nested deeper than
``MAX_JSON_DEPTH`` is 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import re
import shutil
import tempfile
import threading
import time
import uuid
from base64 import b64encode
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from nextgpt import modality as modality_registry
from nextgpt.encoders.preprocess.common import MediaDecodeError
from nextgpt.serve.protocol import ChatRequest, RequestError, Upload, parse_chat_request

log = logging.getLogger(__name__)

FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in a request body; a chat request needs about 6
# a JSON string, escapes included; one left open runs to the end, so every '"' starts a match and
# the scan is one pass (a pattern that can fail after a '"' is quadratic on '"\\"\\"\\"...')
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of ``body`` nest, counted without parsing (``json.loads``
    recurses once per level). Linear: a request's base64 has no brackets and takes milliseconds; a
    hostile body of the largest size (millions of strings or escapes) takes seconds, about what
    parsing it would."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    a = np.frombuffer(brackets, np.uint8)
    steps = ((a >> 1) & 1).astype(np.int8) * 2 - 1  # [ and { have bit 1 set (+1), ] and } do not (-1)
    return max(int(np.cumsum(steps, dtype=np.int32).max()), 0)  # below 0: invalid, json.loads stops there


@dataclass
class ServeSettings:
    out: Path = Path("outputs/serve")  # generated media, one folder per request
    model_name: str = "nextgpt"
    max_upload_bytes: int = 20 * 2**20  # the uploads of one request together
    max_queue: int = 16  # requests waiting or running; the next is refused with 429
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64
    keep_requests: int = 1000  # the newest requests whose generated files stay on disk


class ModelWorker:
    """Runs model calls on one thread, in arrival order, with a bounded queue."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.pending = 0  # changed on the event loop's thread only
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextgpt-model")

    def admit(self) -> None:
        if self.pending >= self.max_queue:
            raise RequestError(
                f"the server is busy: {self.pending} requests are queued (limit {self.max_queue}); "
                f"retry later",
                status=429,
                code="queue_full",
            )
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)


class _Cancelled(Exception):
    """The client went away during a streamed answer: stop generating."""


def _check_uploads(uploads: list[Upload]) -> None:
    """Decode every upload as the model would (off the event loop); a corrupt one is the client's error."""
    for up in uploads:
        try:
            modality_registry.get(up.modality).load(up.data)
        except MediaDecodeError as e:
            raise RequestError(
                f"{up.where}: the {up.modality} could not be decoded: {e.reason}",
                param=up.where,
                code="invalid_media",
            ) from None


def _write_uploads(uploads: list[Upload], folder: Path) -> dict[Path, str]:
    """Each upload to its own file (the loaders read files by suffix): path -> where it was in the request."""
    paths = {}
    for k, up in enumerate(uploads):
        path = folder / f"upload{k}{up.suffix}"
        path.write_bytes(up.data)
        paths[path] = up.where
    return paths


def parse_json(body: bytes) -> Any:
    """A request body -> JSON, refusing (400) what is not JSON or nests deeper than ``MAX_JSON_DEPTH``."""
    openers = body.count(b"[") + body.count(b"{")  # no deeper than this: most requests skip the count
    if openers > MAX_JSON_DEPTH and (depth := json_depth(body)) > MAX_JSON_DEPTH:
        raise RequestError(
            f"the request body's JSON nests arrays/objects {depth} levels deep; the limit is "
            f"{MAX_JSON_DEPTH}",
            code="json_too_deep",
        )
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # unbalanced brackets can pass the count; never a 500 all the same
        raise RequestError(
            f"the request body's JSON nests arrays/objects deeper than {MAX_JSON_DEPTH} levels",
            code="json_too_deep",
        ) from None


class ChatService:
    """What the endpoints do, apart from HTTP: parse, check, queue, generate, describe the media."""

    def __init__(self, generator: Any, settings: ServeSettings):
        self.generator, self.settings = generator, settings
        self.worker = ModelWorker(settings.max_queue)
        self.out = Path(settings.out).absolute()
        self.out.mkdir(parents=True, exist_ok=True)
        self.out_real = self.out.resolve()  # files are served only from under here, symlinks resolved
        self._prune_lock = threading.Lock()

    def parse(self, body: Any) -> ChatRequest:
        s = self.settings
        req = parse_chat_request(
            body,
            max_upload_bytes=s.max_upload_bytes,
            max_new_tokens_limit=s.max_tokens,
            default_max_tokens=s.default_max_tokens,
        )
        if req.model not in ("", s.model_name):
            raise RequestError(
                f"model {req.model!r} is not served here; this server serves {s.model_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        return req

    def generate(self, req: ChatRequest, rid: str, on_text: Callable[[str], None] | None = None):
        """Runs on the model thread: the uploads to files, the answer, its media files."""
        from nextgpt.generate import (  # deferred: transformers and lightning (~3 s); a stand-in model needs none
            GenerationInputError,
        )

        self._prune()
        with tempfile.TemporaryDirectory(prefix="nextgpt-serve-") as tmp:  # uploads are not kept
            paths = _write_uploads([*req.history_media, *req.media], Path(tmp))
            files = list(paths)
            try:
                return self.generator.chat(
                    req.prompt,
                    files[len(req.history_media) :],
                    req.history,
                    history_media=files[: len(req.history_media)],
                    max_new_tokens=req.max_new_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                    out_dir=self.out / rid,
                    on_text=on_text,
                )
            except (GenerationInputError, MediaDecodeError) as e:
                message = str(e)
                for path, where in paths.items():
                    message = message.replace(str(path), where)
                raise RequestError(message) from None

    def _prune(self) -> None:
        """Keep the newest ``keep_requests`` request folders of generated media."""
        with self._prune_lock:
            folders = sorted((p for p in self.out.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            for old in folders[: max(len(folders) - self.settings.keep_requests + 1, 0)]:
                shutil.rmtree(old, ignore_errors=True)

    def media(self, result: Any, rid: str, base_url: str, media_format: str) -> list[dict]:
        items = []
        for name, files in result.files.items():
            for path in files:
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                item = {"type": name, "mime_type": mime}
                if media_format == "b64_json":
                    item["b64_json"] = b64encode(Path(path).read_bytes()).decode()
                else:
                    item["url"] = f"{base_url.rstrip('/')}/v1/files/{rid}/{path.name}"
                items.append(item)
        return items

    def file(self, rid: str, name: str) -> Path:
        """The generated file ``name`` of request ``rid``: a plain name whose real path (symlinks
        resolved) is in that request's folder under ``out``; anything else is 404, as unknown."""
        for part, value in (("request id", rid), ("file name", name)):
            if not FILE_NAME.fullmatch(value) or ".." in value or value == ".":
                raise RequestError(
                    f"no such file: invalid {part} {value[:80]!r} (a plain name: letters, digits, "
                    f"'_', '-', '.'; no path separators, no '..')",
                    status=404,
                    code="not_found",
                )
        try:
            real = (self.out / rid / name).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            real = None
        if real is None or real.parent != self.out_real / rid or not real.is_file():
            raise RequestError(
                f"no such file: {rid}/{name} (generated files of the newest "
                f"{self.settings.keep_requests} requests are kept)",
                status=404,
                code="not_found",
            )
        return real


def _usage(result: Any) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.new_tokens,
        "total_tokens": result.prompt_tokens + result.new_tokens,
    }


def _error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(generator: Any, settings: ServeSettings | None = None):
    """The FastAPI app serving ``generator`` (loaded once, before the app starts)."""
    settings = settings or ServeSettings()
    service = ChatService(generator, settings)
    app = FastAPI(
        title="nextgpt-lightning", description="OpenAI-compatible chat completions with media in and out"
    )
    app.state.service = service
    max_body = settings.max_upload_bytes * 4 // 3 + 2**20  # base64 and the JSON around it

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException):
        return _error_response(RequestError(str(e.detail), status=e.status_code, code="http_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return _error_response(RequestError(f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        log.exception("serve: request failed")
        return JSONResponse(
            {
                "error": {
                    "message": f"internal server error ({type(e).__name__}); see the server log",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                }
            },
            status_code=500,
        )

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise RequestError(
                f"the request body is {declared} bytes; the limit is {max_body} "
                f"(uploads: {settings.max_upload_bytes} bytes)",
                status=413,
                code="upload_too_large",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise RequestError(
                    f"the request body exceeds the limit of {max_body} bytes",
                    status=413,
                    code="upload_too_large",
                )
        return await run_in_threadpool(parse_json, bytes(body))  # a big body does not stall the event loop

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": service.worker.pending}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "nextgpt-lightning"}
            ],
        }

    @app.get("/v1/files/{rid}/{name}")
    async def files(rid: str, name: str):
        return FileResponse(service.file(rid, name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = service.parse(await read_json(request))
        await run_in_threadpool(_check_uploads, [*req.history_media, *req.media])
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        base_url = str(request.base_url)
        service.worker.admit()
        if req.stream:
            return StreamingResponse(
                _stream(service, req, rid, created, base_url),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            result = await service.worker.run(lambda: service.generate(req, rid))
        finally:
            service.worker.release()
        message = {
            "role": "assistant",
            "content": result.text,
            "media": service.media(result, rid, base_url, req.media_format),
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": settings.model_name,
            "choices": [
                {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
            ],
            "usage": _usage(result),
            "notes": result.notes,
        }

    return app


class StreamDelta(TypedDict, total=False):
    """One streamed chunk's ``delta``: the role first, then text, then the generated media."""

    role: str
    content: str
    media: list[dict]


async def _stream(
    service: ChatService, req: ChatRequest, rid: str, created: int, base_url: str
) -> AsyncIterator[str]:
    """Server-sent events: the role, the text as it is generated, the media and finish reason last.

    The streamed pieces add up to exactly the non-streamed ``content``: text is held back while it
    could still change (a partial stop string, an incomplete character) and sent at the end.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    stop_len = len(service.generator.template.stop)
    sent = [""]

    def chunk(delta: StreamDelta, finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": service.settings.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def on_text(text: str) -> None:  # on the model thread
        if cancelled.is_set():
            raise _Cancelled
        safe = text[: max(len(text) - stop_len, 0)]
        if safe.startswith(sent[0]) and len(safe) > len(sent[0]) and not safe.endswith("\ufffd"):
            delta, sent[0] = safe[len(sent[0]) :], safe
            loop.call_soon_threadsafe(events.put_nowait, ("text", delta))

    def work() -> None:
        try:
            result = service.generate(req, rid, on_text)
            loop.call_soon_threadsafe(events.put_nowait, ("done", result))
        except BaseException as e:  # noqa: BLE001 - every failure ends the stream with its message
            loop.call_soon_threadsafe(events.put_nowait, ("error", e))

    loop.run_in_executor(service.worker.executor, work)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield chunk({"content": value})
                continue
            if kind == "error":
                if isinstance(value, _Cancelled):
                    return
                err = (
                    value
                    if isinstance(value, RequestError)
                    else RequestError(
                        f"internal server error ({type(value).__name__}); see the server log",
                        status=500,
                        code="internal_error",
                    )
                )
                if not isinstance(value, RequestError):
                    log.error("serve: streamed request failed", exc_info=value)
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            result = value
            rest = result.text[len(sent[0]) :] if result.text.startswith(sent[0]) else ""
            if not result.text.startswith(sent[0]):
                log.warning("serve: streamed text %r is not a prefix of the answer %r", sent[0], result.text)
            if rest:
                yield chunk({"content": rest})
            usage = {"usage": _usage(result)} if req.options.get("include_usage") else {}
            yield chunk(
                {"media": service.media(result, rid, base_url, req.media_format)},
                result.finish_reason,
                **usage,
            )
            yield "data: [DONE]\n\n"
            return
    finally:
        cancelled.set()  # a client that went away stops the generation at its next token
        service.worker.release()
