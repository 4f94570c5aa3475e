"""``python -m nextgpt.serve bundle=DIR [port=8000] [host=127.0.0.1] [key=value ...]``

Serves a stage bundle over an OpenAI-compatible API (see :mod:`nextgpt.serve.app`). Arguments are
``key=value`` pairs, like ``train.py``'s overrides; every one is checked before the model loads,
and the port is tried before the model loads too.

    python -m nextgpt.serve bundle=bundles/stage3 port=8000
    # then, with the official client:
    #   OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nextgpt.serve.args import ServeArgs

# key -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "bundle": (str, None, "a stage bundle folder (bundles/stage3); required"),
    "host": (str, "127.0.0.1", "the address to bind; 0.0.0.0 serves every network the machine is on"),
    "port": (int, 8000, "the TCP port"),
    "device": (str, None, "cpu or cuda (default: cuda when available)"),
    "out": (str, "outputs/serve", "where generated media go, one folder per request"),
    "model_name": (str, None, "the model id clients name (default: the bundle folder's name)"),
    "max_upload_mb": (float, 20.0, "the largest total upload of one request, in MiB"),
    "max_queue": (int, 16, "requests waiting or running at once; the next gets 429"),
    "max_tokens": (int, 512, "the largest max_tokens a request may ask for"),
    "default_max_tokens": (int, 64, "max_tokens when a request gives none"),
    "keep_requests": (int, 1000, "how many requests' generated files stay on disk"),
    "weights": (str, None, "where the real backbone weights are now, if they moved since training"),
    "backbones": (str, None, "where the tiny backbones are now, if they moved since training"),
    "log_level": (str, "info", "uvicorn's log level"),
}


class UsageError(ValueError):
    pass


def usage() -> str:
    lines = [__doc__.strip(), "", "keys:"]
    lines += [f"  {k}={(d if d is not None else '...')!s:<16} {h}" for k, (_, d, h) in OPTIONS.items()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> ServeArgs:
    args: dict[str, Any] = {k: d for k, (_, d, _) in OPTIONS.items()}
    for item in argv:
        key, eq, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not eq:
            raise UsageError(f"argument {item!r} is not key=value")
        if key not in OPTIONS:
            raise UsageError(f"unknown key {key!r}; known: {', '.join(OPTIONS)}")
        kind = OPTIONS[key][0]
        try:
            args[key] = kind(value)
        except ValueError:
            raise UsageError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    if not args["bundle"]:
        raise UsageError("bundle=DIR is required (a stage bundle folder written by train.py)")
    bundle = Path(args["bundle"])
    if not (bundle / "trainable.safetensors").is_file() or not (bundle / "config.yaml").is_file():
        raise UsageError(
            f"bundle={bundle}: not a stage bundle folder (it needs trainable.safetensors and config.yaml; "
            f"train.py writes bundles/stage<N>/)"
        )
    if not 0 < args["port"] < 65536:
        raise UsageError(f"port={args['port']} is not a TCP port (1-65535)")
    for key in ("max_upload_mb", "max_queue", "max_tokens", "default_max_tokens", "keep_requests"):
        if args[key] <= 0:
            raise UsageError(f"{key}={args[key]} must be positive")
    if args["default_max_tokens"] > args["max_tokens"]:
        raise UsageError(
            f"default_max_tokens={args['default_max_tokens']} exceeds max_tokens={args['max_tokens']}"
        )
    return ServeArgs(**args)


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address can not be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(
                f"host={host} port={port}: can not listen there ({e.strerror}); choose another port"
            ) from e


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        check_port(args.host, args.port)
    except UsageError as e:
        print(f"error: {e}\n(python -m nextgpt.serve --help lists the keys)", file=sys.stderr)
        return 2
    from nextgpt.serve.launch import (  # deferred: torch, fastapi, the model stack (~3 s) load after the checks
        serve,
    )

    return serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
