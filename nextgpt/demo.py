"""A web demo: chat with a stage bundle in the browser, attach media, see generated media inline.

    python -m nextgpt.demo --bundle bundles/stage3 [--host 127.0.0.1] [--port 7860] [--out outputs/web_demo]
                           [--allow-bundles DIR[,DIR...]]

One ``Generator`` serves every browser session (requests run one at a time); each session keeps
its own conversation (turns + attached media) so follow-up questions see the earlier turns. Every
bad input (an empty or overlong prompt, an unsupported or corrupt file, a missing or foreign
bundle folder) becomes a message in the status box: no exception leaves a handler, so the app
stays up. Upload boxes are built from the modality registry, so a new modality gets one here too.

The page loads only the bundle the demo was started with: a visitor can not switch the shared
model to another folder unless ``--allow-bundles`` names the folders it may come from (the path
asked for is resolved, symlinks followed, and must be one of them or inside one). A refusal reads
the same whether the path exists or not, so the box tells nothing about the server's disk.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# no telemetry / version check: the demo must work offline (set before gradio is imported)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import torch

from nextgpt import modality as modality_registry
from nextgpt.bundles import BundleError
from nextgpt.demo_backend import (
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_OUT,
    ChatState,
    DemoBackend,
    DemoInputError,
    load_generator,
    status_html,
)
from nextgpt.prompts import placeholder_pattern

log = logging.getLogger(__name__)


def _display(text: str) -> str:
    """Placeholders as code: a bare ``<image>`` would be parsed by the browser as an <img> tag."""
    return placeholder_pattern().sub(lambda m: f"`{m.group(0)}`", text)


def _error_text(e: BaseException) -> str:
    """The user-facing text of an exception: input errors as they are, anything else with its type."""
    if isinstance(e, (ValueError, BundleError, FileNotFoundError)):
        return str(e)
    return f"{type(e).__name__}: {e} (see the server log)"


def build_app(
    generator: Any | None,
    *,
    out_dir: str | Path = DEFAULT_OUT,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    device: str = "cpu",
    bundle_path: str | Path | None = None,
    bundle_error: str | None = None,
    allowed_bundles: Sequence[str | Path] = (),
) -> gr.Blocks:
    """The Gradio app around ``generator`` (None: start without a model, showing ``bundle_error``).

    The bundle box loads ``bundle_path`` (the started bundle) again, or, when ``allowed_bundles``
    names folders, any bundle in or under them; without them the box is read-only."""
    if bundle_path is None and generator is not None:
        bundle_path = getattr(generator, "bundle", "")
    backend = DemoBackend(
        generator,
        out_dir=out_dir,
        max_prompt_chars=max_prompt_chars,
        device=device,
        bundle_error=bundle_error,
        bundle_path=bundle_path,
        allowed_bundles=allowed_bundles,
    )
    names = modality_registry.names()
    if backend.allowed_bundles:
        bundle_note = (
            "Loads the started bundle again, or a stage bundle in "
            f"{', '.join(map(str, backend.allowed_bundles))} (--allow-bundles)."
        )
    else:
        bundle_note = (
            "Loading another bundle is off: this demo serves only the bundle it was started with "
            "(restart it with --allow-bundles DIR to let this box load bundles from DIR)."
        )
    skip = gr.skip()

    with gr.Blocks(title="NExT-GPT demo", analytics_enabled=False) as app:
        app.backend = backend  # for tests and embedding
        gr.Markdown(
            "## NExT-GPT: any-to-any chat\nAsk about attached media, or ask for an image, a sound or a "
            "video (\u201cPlease make an image of a red circle at the top left on a black background\u201d)."
        )
        header = gr.Markdown(html.escape(backend.describe(), quote=False), elem_id="model-info")
        state = gr.State(ChatState())
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Chat",
                    elem_id="chat",
                    height=520,
                    allow_file_downloads=True,
                    buttons=["copy"],
                    feedback_options=None,
                )
                prompt = gr.Textbox(
                    label="Message",
                    placeholder="Type a message and press Enter",
                    lines=2,
                    elem_id="prompt",
                    submit_btn=False,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.HTML(
                    status_html("" if generator else backend.describe(), "info" if generator else "error"),
                    elem_id="status",
                )
            with gr.Column(scale=2):
                uploads = {
                    n: gr.File(
                        label=f"{n.capitalize()} ({' '.join(modality_registry.get(n).extensions)})",
                        type="filepath",
                        file_count="single",
                        elem_id=f"{n}-upload",
                        height=110,
                    )
                    for n in names
                }
                with gr.Accordion("Generation options", open=True):
                    max_new = gr.Slider(
                        1, 512, value=64, step=1, label="Max new tokens", elem_id="max-new-tokens"
                    )
                    temperature = gr.Slider(
                        0.0,
                        2.0,
                        value=0.0,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                        elem_id="temperature",
                    )
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                downloads = gr.File(
                    label="Generated files",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                    height=140,
                )
                with gr.Accordion("Bundle", open=generator is None, elem_id="bundle-panel"):
                    gr.Markdown(html.escape(bundle_note, quote=False), elem_id="bundle-note")
                    bundle_box = gr.Textbox(
                        value=str(bundle_path or ""),
                        label="Stage bundle folder",
                        elem_id="bundle",
                        interactive=bool(backend.allowed_bundles),
                    )
                    load = gr.Button("Load bundle", elem_id="load-bundle")

        def respond(text: str, *args: Any) -> tuple:
            """One turn; every failure (bad input or not) ends up in the status box."""
            files_in, (n_tok, temp, sd, messages, st) = args[: len(names)], args[len(names) :]
            messages = list(messages or [])
            try:
                new, res = backend.answer(
                    text,
                    dict(zip(names, files_in, strict=False)),
                    st,
                    max_new_tokens=n_tok or 64,
                    temperature=temp or 0.0,
                    seed=int(sd or 0),
                )
            except Exception as e:  # the app must stay up whatever happens
                if not isinstance(e, ValueError):
                    log.exception("demo: request failed")
                return (skip, skip, skip, *[skip] * len(names), status_html(_error_text(e), "error"), skip)
            answer = new.turns[-1][1]
            attached = new.media[len(st.media) :]
            messages.append(
                {"role": "user", "content": [_display(text.strip()), *[{"path": p} for p in attached]]}
            )
            produced = [f for name in names for f in res.files.get(name, [])]
            messages.append(
                {
                    "role": "assistant",
                    "content": [_display(answer) or "(no text)", *[{"path": str(f)} for f in produced]],
                }
            )
            note = "; ".join(getattr(res, "notes", []) or [])
            done = (
                f"answered in {res.seconds:.1f} s ({res.new_tokens} tokens"
                + (f", {len(produced)} file(s) generated" if produced else "")
                + ")"
                + (f"; note: {note}" if note else "")
            )
            return (messages, new, "", *[None] * len(names), status_html(done, "ok"), new.files or None)

        def reset() -> tuple:
            return [], ChatState(), "", *[None] * len(names), status_html("new conversation", "info"), None

        def load_bundle(path: str) -> tuple[str, str]:
            try:
                msg = backend.load_bundle(path)
            except Exception as e:  # a handler never raises: the page shows the reason
                log.exception("demo: loading a bundle failed")
                msg = status_html(_error_text(e), "error")
            return msg, html.escape(backend.describe(), quote=False)

        outputs = [chatbot, state, prompt, *uploads.values(), status, downloads]
        inputs = [prompt, *uploads.values(), max_new, temperature, seed, chatbot, state]
        for event in (send.click, prompt.submit):
            event(respond, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        clear.click(reset, None, outputs, queue=False)
        chatbot.clear(
            reset, None, outputs, queue=False
        )  # the chat's own trash button forgets the history too
        load.click(
            load_bundle, [bundle_box], [status, header], concurrency_limit=1, concurrency_id="generate"
        )
    return app


def launch(
    app: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    out_dir: str | Path = DEFAULT_OUT,
    block: bool = True,
) -> None:
    """Serve ``app``; generated files under ``out_dir`` may be served even outside the cwd."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # system fonts only: the default theme would fetch Google Fonts, which an offline browser waits for
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(Path(out_dir).resolve())],
        theme=theme,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=False,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``allow_bundles`` is a list of existing folders (repeated and comma-separated
    flags together), empty when the flag is not given."""
    p = argparse.ArgumentParser(
        prog="python -m nextgpt.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="a stage bundle folder (bundles/stage3)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--out", default=DEFAULT_OUT, help="where generated files go (one folder per session and turn)"
    )
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--allow-bundles",
        action="append",
        default=[],
        metavar="DIR[,DIR...]",
        help="folders whose stage bundles the page's Load box may load (repeatable); without it the "
        "page serves only --bundle. Every visitor shares the model: allow only folders you trust",
    )
    args = p.parse_args(argv)
    folders = [
        Path(d.strip()).expanduser() for item in args.allow_bundles for d in item.split(",") if d.strip()
    ]
    for d in folders:
        if not d.is_dir():
            p.error(f"--allow-bundles {d}: not a folder")
    args.allow_bundles = folders
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    generator, error = None, None
    try:
        generator = load_generator(args.bundle, args.device)
    except DemoInputError as e:  # start anyway: the page says what is wrong and can load another bundle
        error = str(e)
        log.error("demo: %s", error)
    app = build_app(
        generator,
        out_dir=args.out,
        max_prompt_chars=args.max_prompt_chars,
        device=args.device,
        bundle_path=args.bundle,
        bundle_error=error,
        allowed_bundles=args.allow_bundles,
    )
    launch(app, host=args.host, port=args.port, out_dir=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
