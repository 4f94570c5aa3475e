"""The OpenAI-compatible server end to end: ``python -m nextgpt.serve`` on the trained demo bundle,
driven by the official ``openai`` client over 127.0.0.1, as a user would.

Every answer the server gives is checked against the same bundle answering in this process
(:class:`nextgpt.generate.Generator`, fixture ``generator``): a text answer about an uploaded image,
an image generated on request (fetched by its URL and as base64), a streamed answer that adds up to
the plain one, 4xx errors with messages for bad requests (hostile ones too: a symlink planted in the
files folder, JSON nested 100000 deep, a body declared larger than the limit), and 8 concurrent
requests that each get their own answer.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.cli import free_port, served_process
from tests.conftest import DEMO_ENV

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

IMAGE_REQUEST = "Please make an image of a red circle at the top left on a black background"
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def served(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``python -m nextgpt.serve bundle=... port=...`` as a user starts it; yields (base URL, log file)."""
    work = tmp_path_factory.mktemp("serve")
    port, log_path = free_port(), work / "server.log"
    url = f"http://127.0.0.1:{port}"
    args = [
        "-m",
        "nextgpt.serve",
        f"bundle={demo_bundle}",
        f"port={port}",
        f"out={work / 'out'}",
        f"max_upload_mb={MAX_UPLOAD_MB}",
        "model_name=demo",
        "log_level=warning",
    ]
    with served_process(args, f"{url}/health", log_path, DEMO_ENV, name="server"):
        yield url, log_path
        assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def images(tiny_cache: Path) -> list[Path]:
    """Synthetic images the project generates itself (tests/conftest.py builds them)."""
    folder = tiny_cache / "synthetic" / "synthetic_image"
    entries = json.loads((folder / "synthetic_image.json").read_text())
    return [folder / "images" / e["image_name"] for e in entries[:8]]


def image_part(path: Path) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()},
    }


def ask_about(path: Path, question: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [image_part(path), {"type": "text", "text": question}]}]


def test_text_answer_about_an_uploaded_image(client, generator, images):
    assert [m.id for m in client.models.list()] == ["demo"]
    reply = client.chat.completions.create(model="demo", messages=ask_about(images[0]))
    expected = generator.chat("Describe this image.", [images[0]])
    assert expected.text.strip()
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.media == [] and reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.new_tokens,
    )
    # the image was read into the prompt: its media tokens are counted
    text_only = generator.chat("Describe this image.", [], decode=False)
    assert reply.usage.prompt_tokens >= text_only.prompt_tokens + generator.num_media_tokens


def test_an_image_generated_on_request_by_url_and_as_base64(client, generator):
    import httpx
    from PIL import Image

    reply = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": IMAGE_REQUEST}]
    )
    expected = generator.chat(IMAGE_REQUEST, decode=False)
    message = reply.choices[0].message
    assert expected.signal_groups == ["image"], expected.text
    assert message.content == expected.text and "<image>" in message.content
    assert [(m["type"], m["mime_type"]) for m in message.media] == [("image", "image/png")]
    size = dict(generator.decoder("image").generate)
    fetched = httpx.get(message.media[0]["url"], timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(fetched.content)).convert("RGB"))
    assert pixels.shape == (size["height"], size["width"], 3)

    inline = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": IMAGE_REQUEST}],
        extra_body={"media_format": "b64_json"},
    )
    item = inline.choices[0].message.media[0]
    assert "url" not in item
    same = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
    assert np.array_equal(same, pixels)  # the same seed: the same image


def test_streamed_tokens_add_up_to_the_answer(client):
    messages = [{"role": "user", "content": IMAGE_REQUEST}]
    plain = client.chat.completions.create(model="demo", messages=messages)
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3, deltas  # streamed as it is generated, not in one piece
    assert "".join(deltas) == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert [m["type"] for m in last.choices[0].delta.media] == ["image"]
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert {c.id for c in chunks} == {chunks[0].id}


def test_bad_requests_get_4xx_with_a_message(client, served, images):
    import httpx

    url = served[0]
    corrupt = {
        "type": "image_url",
        "image_url": {
            "url": "data:image/png;base64,"
            + base64.b64encode(b"\x89PNG\r\n\x1a\n not really a png" * 4).decode()
        },
    }
    with pytest.raises(
        openai.BadRequestError,
        match=r"messages\[0\].content\[0\].image_url.url: the image could "
        r"not be decoded",
    ) as bad:
        client.chat.completions.create(
            model="demo",
            messages=[
                {"role": "user", "content": [corrupt, {"type": "text", "text": "Describe this image."}]}
            ],
        )
    assert bad.value.status_code == 400
    too_big = {
        "type": "image_url",
        "image_url": {
            "url": "data:image/png;base64,"
            + base64.b64encode(os.urandom(MAX_UPLOAD_MB * 2**20 + 10)).decode()
        },
    }
    with pytest.raises(openai.APIStatusError, match="larger than the limit") as big:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [too_big]}])
    assert big.value.status_code == 413
    with pytest.raises(
        openai.NotFoundError, match="model 'gpt-4o' is not served here; this server serves 'demo'"
    ):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    for response in (
        httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30),
        httpx.post(f"{url}/v1/chat/completions", json={"model": "demo", "messages": "hi"}, timeout=30),
        httpx.get(f"{url}/v1/files/nothing/here.png", timeout=30),
        httpx.get(f"{url}/v1/nowhere", timeout=30),
    ):
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["message"] and "Traceback" not in response.text
    # the server still answers after all of it
    ok = client.chat.completions.create(model="demo", messages=ask_about(images[1]))
    assert ok.choices[0].message.content


def test_hostile_requests_get_4xx_and_files_stay_in_their_folder(client, served, tmp_path):
    import socket
    from urllib.parse import urlsplit

    import httpx

    url, log_path = served
    out = log_path.parent / "out"  # the server's out= folder (the fixture's)
    planted = out / "chatcmpl-planted"
    planted.mkdir(parents=True)
    (planted / "image_0.png").write_bytes(b"\x89PNG planted")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside the files folder 5d2f")
    (planted / "leak.png").symlink_to(secret)
    (planted / "hostname").symlink_to("/etc/hostname")
    assert httpx.get(f"{url}/v1/files/chatcmpl-planted/image_0.png", timeout=30).content == b"\x89PNG planted"
    for name in ("leak.png", "hostname"):
        r = httpx.get(f"{url}/v1/files/chatcmpl-planted/{name}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        assert f"no such file: chatcmpl-planted/{name}" in r.json()["error"]["message"]
        assert b"5d2f" not in r.content
    r = httpx.get(f"{url}/v1/files/chatcmpl-planted/%2E%2E", timeout=30)
    assert r.status_code == 404 and "invalid file name '..'" in r.json()["error"]["message"]

    deep = '{"model": "demo", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{url}/v1/chat/completions", content=deep, timeout=30)
    assert r.status_code == 400 and "levels deep; the limit is 64" in r.json()["error"]["message"], r.text

    # a body declared larger than the limit: 413 from the header, before a byte of it is read
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\nConnection: close\r\n\r\n{}"
        )
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), raw[:400]
    assert "the request body is 999999999 bytes; the limit is" in json.loads(body)["error"]["message"]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # and the server is still up


def test_eight_concurrent_requests_each_get_their_own_answer(client, generator, images):
    # sampled (temperature 1) with a seed and a length of their own: answers differ, so a mix-up shows
    jobs = [(images[k], k, 6 + 3 * k) for k in range(8)]

    def ask(job):
        path, seed, max_tokens = job
        reply = client.chat.completions.create(
            model="demo", messages=ask_about(path), temperature=1.0, seed=seed, max_tokens=max_tokens
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    expected = [
        generator.chat("Describe this image.", [p], temperature=1.0, seed=s, max_new_tokens=n).text
        for p, s, n in jobs
    ]
    assert answers == expected
    assert len(set(answers)) >= 6, answers
