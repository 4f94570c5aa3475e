"""Serving checked command-line arguments (:mod:`nextgpt.serve.__main__` checks them first, so that
``--help`` and usage errors answer before any of this loads): the bundle's ``Generator``, the app
around it, uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import uvicorn

from nextgpt.bundles import BundleError
from nextgpt.generate import Generator
from nextgpt.serve.app import ServeSettings, build_app
from nextgpt.serve.args import ServeArgs

log = logging.getLogger("nextgpt.serve")


def serve(args: ServeArgs) -> int:
    """Load the bundle and serve it until stopped; 2 when the bundle can not be loaded."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serve: binding %s: the API has no authentication; anyone who reaches the port can use it",
            args.host,
        )
    try:
        generator = Generator(args.bundle, device, weights=args.weights, backbones=args.backbones)
    except (BundleError, FileNotFoundError, ValueError) as e:
        print(f"error: bundle={args.bundle}: {e}", file=sys.stderr)
        return 2
    settings = ServeSettings(
        out=Path(args.out),
        model_name=args.model_name or Path(args.bundle).resolve().name,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens,
        keep_requests=args.keep_requests,
    )
    app = build_app(generator, settings)
    log.info(
        "serving %s (stage %s) as model %r at http://%s:%d/v1",
        args.bundle,
        generator.stage,
        settings.model_name,
        args.host,
        args.port,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
