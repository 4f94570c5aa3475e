"""The server's reading of the OpenAI chat-completions format: content parts, turns, limits and every
refusal with its status and the field it names. No model: these run in milliseconds."""

from __future__ import annotations

import base64
import io

import pytest

from nextgpt.serve.protocol import RequestError, parse_chat_request

LIMITS = {"max_upload_bytes": 4096, "max_new_tokens_limit": 128, "default_max_tokens": 32}


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def parse(**body):
    return parse_chat_request(body, **LIMITS)


def refused(status: int, match: str, **body) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        parse(**body)
    assert info.value.status == status, info.value
    assert info.value.body()["error"]["message"] == str(info.value)
    return info.value


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def test_parts_become_placeholders_in_place_and_uploads_in_order():
    img = png_bytes()
    req = parse(
        messages=[
            {"role": "system", "content": "You are helpful."},
            user(
                {"type": "image_url", "image_url": {"url": data_url(img)}},
                {"type": "text", "text": "What is it?"},
            ),
            {"role": "assistant", "content": "A red square. <image>"},
            user(
                {"type": "text", "text": "Compare with"},
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"},
                },
                {"type": "video_url", "video_url": {"url": data_url(b"\x00\x00", "video/mp4")}},
            ),
        ],
        max_tokens=10,
        temperature=0.5,
        seed=3,
        model="m",
    )
    assert req.history == [("<image>\nWhat is it?", "A red square. <image>")]
    assert [(u.where, u.modality, u.suffix) for u in req.history_media] == [
        ("messages[1].content[0].image_url.url", "image", ".png")
    ]
    assert req.history_media[0].data == img
    assert req.prompt == "Compare with\n<audio>\n<video>"
    assert [(u.modality, u.suffix, u.where) for u in req.media] == [
        ("audio", ".wav", "messages[3].content[1].input_audio"),
        ("video", ".mp4", "messages[3].content[2].video_url.url"),
    ]
    assert (req.max_new_tokens, req.temperature, req.seed, req.stream, req.model) == (10, 0.5, 3, False, "m")


def test_defaults_and_merged_consecutive_user_messages():
    req = parse(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert (req.prompt, req.history, req.max_new_tokens, req.temperature, req.top_p) == (
        "a\nb",
        [],
        32,
        0.0,
        1.0,
    )
    assert parse(messages=[user({"type": "text", "text": "x"})], max_completion_tokens=7).max_new_tokens == 7


@pytest.mark.parametrize(
    "body, status, match",
    [
        ({}, 400, "messages must be a non-empty list"),
        ({"messages": []}, 400, "messages must be a non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, r"messages\[0\].role must be"),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            400,
            "starts with an assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            400,
            "last message must be a user message",
        ),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "has no text"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, r"messages\[0\].content must be a string"),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})]},
            400,
            "only data URLs",
        ),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": "data:image/png,abc"}})]},
            400,
            "must be base64",
        ),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}})]},
            400,
            r"messages\[0\].content\[0\].image_url.url: the media data is not valid base64",
        ),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": "data:text/plain;base64,YQ=="}})]},
            400,
            "unsupported media type 'text/plain'",
        ),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": "data:audio/wav;base64,YQ=="}})]},
            400,
            "audio/wav is audio, not image",
        ),
        (
            {"messages": [user({"type": "input_audio", "input_audio": {"data": "YQ==", "format": "aiff"}})]},
            400,
            "format 'aiff' is not supported",
        ),
        ({"messages": [user({"type": "file", "file": {}})]}, 400, "unsupported content part type 'file'"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n must be 1"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000},
            400,
            "max_tokens must be between 1 and 128",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5},
            400,
            "max_tokens must be an integer",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "temperature must be a number",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            400,
            "stream must be true or false",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "media_format": "png"},
            400,
            "media_format must be",
        ),
    ],
)
def test_bad_requests_are_refused_naming_the_field(body, status, match):
    refused(status, match, **body)


def test_uploads_over_the_limit_are_413_per_part_and_per_request():
    big = data_url(b"\x00" * 5000)
    err = refused(
        413,
        r"messages\[0\].content\[0\].image_url.url: the upload is larger than the limit of 4096",
        messages=[user({"type": "image_url", "image_url": {"url": big}})],
    )
    assert err.code == "upload_too_large"
    part = {"type": "image_url", "image_url": {"url": data_url(b"\x00" * 2500)}}
    refused(413, "together exceed the limit", messages=[user(part, part)])


def test_an_assistant_message_with_media_is_refused():
    refused(
        400,
        "an assistant message holds media",
        messages=[
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}],
            },
            {"role": "user", "content": "y"},
        ],
    )


# --- the command line and the queue: checked before any model loads --------------------------
def fake_bundle(tmp_path):
    (tmp_path / "trainable.safetensors").write_bytes(b"")
    (tmp_path / "config.yaml").write_text("{}")
    return tmp_path


@pytest.mark.parametrize(
    "args, match",
    [
        ([], "bundle=DIR is required"),
        (["bundle"], "is not key=value"),
        (["bundel=x"], "unknown key 'bundel'"),
        (["bundle=/no/such/dir"], "not a stage bundle folder"),
        (["port=http"], "port='http' is not a valid int"),
        (["port=70000", "BUNDLE"], "not a TCP port"),
        (["max_queue=0", "BUNDLE"], "max_queue=0 must be positive"),
        (["default_max_tokens=600", "BUNDLE"], "default_max_tokens=600 exceeds max_tokens=512"),
    ],
)
def test_command_line_errors_name_the_key_and_exit_2(args, match, tmp_path, capsys):
    from nextgpt.serve.__main__ import main

    bundle = fake_bundle(tmp_path)
    assert main([f"bundle={bundle}" if a == "BUNDLE" else a for a in args]) == 2
    assert match in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, capsys):
    import socket

    from nextgpt.serve.__main__ import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main([f"bundle={fake_bundle(tmp_path)}", f"port={port}"]) == 2
    assert f"port={port}: can not listen there" in capsys.readouterr().err


def test_the_queue_is_bounded_with_429():
    from nextgpt.serve.app import ModelWorker

    worker = ModelWorker(max_queue=2)
    worker.admit()
    worker.admit()
    with pytest.raises(RequestError, match="the server is busy: 2 requests are queued") as info:
        worker.admit()
    assert info.value.status == 429
    worker.release()
    worker.admit()  # a freed place is taken again
