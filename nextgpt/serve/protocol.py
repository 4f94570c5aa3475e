"""The OpenAI chat-completions wire format, as this server reads and writes it.

Requests: ``messages`` of ``role`` system / user / assistant, each ``content`` a string or a list
of content parts, as OpenAI's client sends them:

- ``{"type": "text", "text": ...}``
- ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
- ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}``
- ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`` (vLLM's name; OpenAI
  has no video part)

Media come as data URLs (or base64 for audio) only: the server fetches nothing from the network.
A media part becomes the modality's placeholder (``<image>``) at its place in the text, the
layout the model was trained on. Parsing never touches the model: every error here is the
client's (:class:`RequestError`, answered with its HTTP status and an OpenAI-style error body).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nextgpt import modality as modality_registry

# media type -> (modality, file suffix the loaders read)
MEDIA_TYPES: dict[str, tuple[str, str]] = {
    "image/png": ("image", ".png"),
    "image/jpeg": ("image", ".jpg"),
    "image/jpg": ("image", ".jpg"),
    "image/webp": ("image", ".webp"),
    "image/bmp": ("image", ".bmp"),
    "image/gif": ("image", ".gif"),
    "audio/wav": ("audio", ".wav"),
    "audio/x-wav": ("audio", ".wav"),
    "audio/wave": ("audio", ".wav"),
    "audio/flac": ("audio", ".flac"),
    "audio/mpeg": ("audio", ".mp3"),
    "audio/mp3": ("audio", ".mp3"),
    "audio/ogg": ("audio", ".ogg"),
    "video/mp4": ("video", ".mp4"),
    "video/webm": ("video", ".webm"),
    "video/x-msvideo": ("video", ".avi"),
    "video/quicktime": ("video", ".mov"),
}
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}
PART_FIELDS = {"image_url": "image", "video_url": "video"}
# request fields this server does not implement: refused when set to anything but their default
UNSUPPORTED = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "logprobs": False,
    "top_logprobs": None,
    "response_format": None,
    "audio": None,
    "modalities": None,
}
DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)", re.DOTALL
)


class RequestError(Exception):
    """A request this server refuses: an HTTP status, a message, and the request field at fault."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Upload:
    """One media part of a request: its bytes, modality and suffix, and where in the request it was."""

    where: str  # "messages[1].content[0]"
    modality: str
    suffix: str
    data: bytes


@dataclass
class ChatRequest:
    """A parsed request: earlier turns, the question, and every upload in turn order."""

    history: list[tuple[str, str]]
    history_media: list[Upload]
    prompt: str
    media: list[Upload]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stream: bool
    media_format: str  # "url" or "b64_json"
    model: str
    options: dict[str, Any] = field(default_factory=dict)


def _number(
    body: Mapping[str, object], key: str, default: float, lo: float, hi: float, *, integer: bool = False
) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not float(value).is_integer())
    ):
        raise RequestError(
            f"{key} must be {'an integer' if integer else 'a number'}, not {value!r}", param=key
        )
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be between {lo:g} and {hi:g}, not {value!r}", param=key)
    return int(value) if integer else float(value)


def decode_base64(text: Any, where: str, limit: int) -> bytes:
    if not isinstance(text, str) or not text:
        raise RequestError(f"{where}: the media data is empty or not a string", param=where)
    if len(text) * 3 // 4 > limit:
        raise RequestError(
            f"{where}: the upload is larger than the limit of {limit} bytes",
            status=413,
            param=where,
            code="upload_too_large",
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the media data is not valid base64 ({e})", param=where) from None


def media_from_url(url: Any, where: str, modality: str, limit: int) -> Upload:
    """A data URL of ``modality`` -> an :class:`Upload`."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:60] if isinstance(url, str) else repr(url)
        raise RequestError(
            f"{where}: only data URLs (data:<type>;base64,...) are accepted; this server fetches "
            f"nothing from the network, got {shown!r}",
            param=where,
        )
    m = DATA_URL.fullmatch(url)
    if m is None or not m.group("b64"):
        raise RequestError(
            f"{where}: a media data URL must be base64 (data:<type>;base64,<data>)", param=where
        )
    mime = (m.group("mime") or "").lower()
    if mime not in MEDIA_TYPES:
        known = sorted(t for t, (mod, _) in MEDIA_TYPES.items() if mod == modality)
        raise RequestError(
            f"{where}: unsupported media type {mime or '(none)'!r}; for {modality} send one of {known}",
            param=where,
        )
    kind, suffix = MEDIA_TYPES[mime]
    if kind != modality:
        raise RequestError(
            f"{where}: {mime} is {kind}, not {modality}; send {kind} in a "
            f"{'input_audio' if kind == 'audio' else kind + '_url'} part",
            param=where,
        )
    return Upload(where, kind, suffix, decode_base64(m.group("data"), where, limit))


def _part(part: Any, where: str, limit: int) -> str | Upload:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where}: a content part must be an object with a 'type'", param=where)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string", param=f"{where}.text")
        return part["text"]
    if kind in PART_FIELDS:
        inner = part.get(kind)
        url = inner.get("url") if isinstance(inner, dict) else inner
        return media_from_url(url, f"{where}.{kind}.url", PART_FIELDS[kind], limit)
    if kind == "input_audio":
        inner = part.get("input_audio")
        if not isinstance(inner, dict):
            raise RequestError(f"{where}.input_audio must be an object with 'data' and 'format'", param=where)
        fmt = str(inner.get("format", "")).lower()
        if fmt not in AUDIO_FORMATS:
            raise RequestError(
                f"{where}.input_audio.format {fmt!r} is not supported; one of {sorted(AUDIO_FORMATS)}",
                param=f"{where}.input_audio.format",
            )
        data = decode_base64(inner.get("data"), f"{where}.input_audio.data", limit)
        return Upload(f"{where}.input_audio", "audio", MEDIA_TYPES[AUDIO_FORMATS[fmt]][1], data)
    raise RequestError(
        f"{where}: unsupported content part type {kind!r}; this server reads text, image_url, "
        f"input_audio and video_url",
        param=where,
    )


def _content(message: Mapping[str, object], where: str, limit: int) -> tuple[str, list[Upload]]:
    """A message's text, with each media part's placeholder at its place, and its uploads."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise RequestError(
            f"{where}.content must be a string or a non-empty list of content parts", param=f"{where}.content"
        )
    pieces, uploads = [], []
    for j, raw in enumerate(content):
        part = _part(raw, f"{where}.content[{j}]", limit)
        if isinstance(part, Upload):
            uploads.append(part)
            pieces.append(modality_registry.get(part.modality).placeholder)
        else:
            pieces.append(part)
    return "\n".join(p for p in pieces if p), uploads


def parse_chat_request(
    body: Any, *, max_upload_bytes: int, max_new_tokens_limit: int, default_max_tokens: int
) -> ChatRequest:
    """The JSON body of ``POST /v1/chat/completions`` -> :class:`ChatRequest`, or :class:`RequestError`."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, [], {}):
            raise RequestError(f"{key} is not supported by this server", param=key)
    if body.get("n", 1) not in (1, None):
        raise RequestError("n must be 1: this server returns one choice per request", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    turns: list[tuple[str, list[Upload]]] = []  # alternating user, assistant
    roles: list[str] = []
    total = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with a role and a content", param=where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(
                f"{where}.role must be system, user or assistant, not {role!r}", param=f"{where}.role"
            )
        if role in ("system", "developer"):
            _content(message, where, max_upload_bytes)  # checked, then left out: the template has its own
            continue
        text, uploads = _content(message, where, max_upload_bytes)
        total += sum(len(u.data) for u in uploads)
        if total > max_upload_bytes:
            raise RequestError(
                f"{where}: the request's uploads together exceed the limit of {max_upload_bytes} bytes",
                status=413,
                param=where,
                code="upload_too_large",
            )
        if role == "assistant" and uploads:
            raise RequestError(
                f"{where}: an assistant message holds media; send the assistant's text only "
                f"(its placeholders stand for the media it generated)",
                param=where,
            )
        if roles and roles[-1] == role:  # consecutive messages of one role read as one
            prev_text, prev_up = turns[-1]
            turns[-1] = ("\n".join(t for t in (prev_text, text) if t), prev_up + uploads)
        else:
            if not roles and role == "assistant":
                raise RequestError(
                    f"{where}: the conversation starts with an assistant message; start with a user message",
                    param=where,
                )
            turns.append((text, uploads))
            roles.append(role)
    if not roles or roles[-1] != "user":
        raise RequestError("the last message must be a user message", param="messages")
    prompt, media = turns[-1]
    if not prompt.strip():
        raise RequestError(
            "the last user message has no text: ask a question or make a request", param="messages"
        )
    history = [(turns[k][0], turns[k + 1][0]) for k in range(0, len(turns) - 1, 2)]
    history_media = [u for k in range(0, len(turns) - 1, 2) for u in turns[k][1]]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    media_format = body.get("media_format", "url")
    if media_format not in ("url", "b64_json"):
        raise RequestError(
            f"media_format must be 'url' or 'b64_json', not {media_format!r}", param="media_format"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, not {stream!r}", param="stream")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    return ChatRequest(
        history=history,
        history_media=history_media,
        prompt=prompt,
        media=media,
        max_new_tokens=_number(
            {key: max_tokens}, key, default_max_tokens, 1, max_new_tokens_limit, integer=True
        ),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        seed=_number(body, "seed", 0, -(2**63), 2**63 - 1, integer=True),
        stream=stream,
        media_format=media_format,
        model=model,
        options={"include_usage": bool((body.get("stream_options") or {}).get("include_usage", False))},
    )
