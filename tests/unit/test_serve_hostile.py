"""The server against hostile requests, in process (FastAPI's TestClient; no model, no socket):
generated files never leave their request's folder (symlinks resolved, no '..' or separators), and
bodies too large or nested too deep get a 4xx naming the problem before ``json.loads`` sees them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from nextgpt.serve.app import MAX_JSON_DEPTH, ServeSettings, build_app, json_depth  # noqa: E402

SECRET = b"top secret bytes outside the files folder 7c1e"
UPLOAD_LIMIT = 4096


@pytest.fixture
def app_and_out(tmp_path: Path):
    """The app with a stand-in model (these requests never reach it) and a files folder holding one
    real generated file, symlinks that leave the folder, and one that stays in it."""
    out = tmp_path / "out"
    app = build_app(object(), ServeSettings(out=out, max_upload_bytes=UPLOAD_LIMIT))
    secret = tmp_path / "secret.png"
    secret.write_bytes(SECRET)
    req, other = out / "chatcmpl-a", out / "chatcmpl-b"
    req.mkdir(parents=True)
    other.mkdir()
    (req / "image_0.png").write_bytes(b"\x89PNG generated")
    (other / "image_0.png").write_bytes(SECRET)
    (req / "leak.png").symlink_to(secret)  # a file outside the files folder
    (req / "hostname").symlink_to("/etc/hostname")
    (req / "other.png").symlink_to(other / "image_0.png")  # inside the files folder, another request's
    (req / "loop.png").symlink_to(req / "loop.png")
    (req / "same.png").symlink_to(req / "image_0.png")  # stays in its own folder
    (out / "chatcmpl-c").symlink_to(tmp_path, target_is_directory=True)  # a request folder that leaves
    (out / "image_0.png").write_bytes(SECRET)  # not in any request folder
    return TestClient(app, raise_server_exceptions=False), out


def error(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    return body["message"]


def test_a_generated_file_is_served(app_and_out):
    client, _ = app_and_out
    for name in ("image_0.png", "same.png"):
        r = client.get(f"/v1/files/chatcmpl-a/{name}")
        assert r.status_code == 200 and r.content == b"\x89PNG generated"


@pytest.mark.parametrize(
    "path",
    [
        "chatcmpl-a/leak.png",
        "chatcmpl-a/hostname",
        "chatcmpl-a/other.png",
        "chatcmpl-a/loop.png",
        "chatcmpl-c/secret.png",
        "chatcmpl-a/missing.png",
    ],
)
def test_symlinks_out_of_the_request_folder_are_404_like_an_unknown_file(app_and_out, path):
    client, _ = app_and_out
    r = client.get(f"/v1/files/{path}")
    assert f"no such file: {path}" in error(r, 404)
    assert SECRET not in r.content
    if Path("/etc/hostname").is_file() and Path("/etc/hostname").read_bytes().strip():
        assert Path("/etc/hostname").read_bytes().strip() not in r.content


@pytest.mark.parametrize(
    "rid, name, where",
    [
        ("chatcmpl-a", "..", "invalid file name '..'"),
        ("chatcmpl-a", ".", "invalid file name '.'"),
        ("..", "image_0.png", "invalid request id '..'"),
        (".", "image_0.png", "invalid request id '.'"),
        ("chatcmpl-a", "..image_0.png", "invalid file name"),
        ("chatcmpl-a", "a/b", "invalid file name 'a/b'"),
        ("chatcmpl-a", "a\\b", "invalid file name"),
    ],
)
def test_names_with_separators_or_dots_are_refused(app_and_out, rid, name, where):
    from nextgpt.serve.protocol import RequestError

    client, _ = app_and_out
    service = client.app.state.service
    with pytest.raises(RequestError, match="no such file") as info:
        service.file(rid, name)
    assert info.value.status == 404 and where in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "/v1/files/chatcmpl-a/%2E%2E",
        "/v1/files/%2E%2E/image_0.png",
        "/v1/files/chatcmpl-a/..%2Fsecret.png",
        "/v1/files/chatcmpl-a/a%5Cb",
        "/v1/files/chatcmpl-a%2F..%2F..%2Fsecret.png/x",
    ],
)
def test_encoded_dots_and_separators_over_http_are_404(app_and_out, url):
    client, _ = app_and_out
    r = client.get(url)
    assert error(r, 404)
    assert SECRET not in r.content


def nested(depth: int, inner: object = 1) -> str:
    return "[" * depth + json.dumps(inner) + "]" * depth


def test_json_nested_too_deep_is_400_naming_the_depth(app_and_out):
    client, _ = app_and_out
    deep = '{"messages": "hi", "metadata": ' + nested(MAX_JSON_DEPTH) + "}"  # 65 levels with the outer object
    message = error(client.post("/v1/chat/completions", content=deep), 400)
    assert f"nests arrays/objects {MAX_JSON_DEPTH + 1} levels deep; the limit is {MAX_JSON_DEPTH}" in message
    for body in ("[" * 200_000 + "]" * 200_000, "[" * 200_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        r = client.post("/v1/chat/completions", content=body)
        assert "levels deep; the limit is 64" in error(r, 400)
    # at the limit it parses; the request is then refused for what it says, not for its depth
    ok = '{"messages": "hi", "metadata": ' + nested(MAX_JSON_DEPTH - 1) + "}"
    assert "messages must be a non-empty list" in error(client.post("/v1/chat/completions", content=ok), 400)
    # brackets inside strings (escaped quotes too) are text, not nesting
    text = json.dumps({"messages": "[" * 1000 + '\\"[[' * 100})
    assert "messages must be a non-empty list" in error(
        client.post("/v1/chat/completions", content=text), 400
    )


def test_json_depth_counts_only_brackets_outside_strings():
    cases = {
        b"": 0,
        b"1": 0,
        b"[]": 1,
        b'{"a": [1, {"b": []}]}': 4,
        b'["]]]", "[[[[", "\\"[["]': 1,
        b'["\\\\", [[]]]': 3,
        b'"\\\\"': 0,
        b'["unterminated [[[[': 1,
        b"]]][[": 0,
        b"[]][[": 1,
        b"[" * 100: 100,
    }
    for body, depth in cases.items():
        assert json_depth(body) == depth, body


def test_json_depth_is_linear_on_escaped_quotes():
    """A pattern that retried at each escaped quote would take hours here; one pass takes well under a second."""
    body = b'"' + b'\\"' * 2_000_000 + b"\\"  # 4 MB, never closed
    start = time.perf_counter()
    assert json_depth(body) == 0
    assert time.perf_counter() - start < 20


def test_an_oversized_body_is_413_before_it_is_parsed(app_and_out):
    client, _ = app_and_out
    limit = UPLOAD_LIMIT * 4 // 3 + 2**20
    declared = client.post("/v1/chat/completions", content=b"{}", headers={"content-length": str(limit + 1)})
    assert f"the request body is {limit + 1} bytes; the limit is {limit}" in error(declared, 413)

    def chunks():  # no Content-Length: the size is counted while reading
        yield b'{"messages": "'
        for _ in range(20):
            yield b"x" * 2**16
        yield b'"}'

    streamed = client.post("/v1/chat/completions", content=chunks())
    assert f"the request body exceeds the limit of {limit} bytes" in error(streamed, 413)
    assert error(client.post("/v1/chat/completions", content=b"{not json"), 400).startswith(
        "the request body is not valid JSON"
    )
