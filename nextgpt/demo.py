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
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# no telemetry / version check: the demo must work offline (set before gradio is imported)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from nextgpt import modality as modality_registry
from nextgpt.generate import with_placeholders
from nextgpt.prompts import placeholder_pattern

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_CHARS = 2000
DEFAULT_OUT = "outputs/web_demo"


class DemoInputError(ValueError):
    """A request the demo refuses; the message tells the user what to change."""


@dataclass
class ChatState:
    """One browser session's conversation: what the model sees as history on the next turn."""

    session: str = ""  # folder name under --out for this session's generated files
    turns: list[tuple[str, str]] = field(default_factory=list)  # (human with placeholders, answer)
    media: list[str] = field(default_factory=list)  # attached files, in placeholder order
    files: list[str] = field(default_factory=list)  # every generated file so far (download list)


def _display(text: str) -> str:
    """Placeholders as code: a bare ``<image>`` would be parsed by the browser as an <img> tag."""
    return placeholder_pattern().sub(lambda m: f"`{m.group(0)}`", text)


def _status(message: str, kind: str = "info") -> str:
    """Status-box HTML; the message is escaped (it may hold paths, placeholders, user text)."""
    icon = {"error": "\u26a0 Error: ", "ok": "\u2713 ", "info": ""}[kind]
    colour = {"error": "#b91c1c", "ok": "#15803d", "info": "inherit"}[kind]
    return (
        f'<div class="nextgpt-status nextgpt-status-{kind}" style="color:{colour};padding:4px 0">'
        f"{icon}{html.escape(message)}</div>"
    )


def check_bundle_dir(path: str | Path) -> Path:
    """Refuse a missing folder or one that is not a stage bundle before any weight loads."""
    from nextgpt.bundles import CONFIG, WEIGHTS

    text = str(path).strip()
    if not text:
        raise DemoInputError("no bundle folder given (train one with: python train.py -m stage=1,2,3)")
    p = Path(text).expanduser()
    if not p.exists():
        raise DemoInputError(f"bundle folder {p} does not exist (train.py writes bundles/stage<N>/)")
    if not p.is_dir():
        raise DemoInputError(f"{p} is a file, not a stage bundle folder")
    missing = [n for n in (WEIGHTS, CONFIG) if not (p / n).is_file()]
    if missing:
        raise DemoInputError(
            f"{p} is not a stage bundle: it has no {' / '.join(missing)} "
            "(train.py writes bundles/stage<N>/ with both)"
        )
    return p


def _real(path: str | Path) -> Path | None:
    """``path`` made absolute with every symlink resolved; None when it can not be (a symlink loop)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def load_generator(path: str | Path, device: str = "cpu") -> Any:
    """A ``Generator`` for the bundle at ``path``, or ``DemoInputError`` saying why not."""
    from nextgpt.generate import Generator

    p = check_bundle_dir(path)
    try:
        return Generator(p, device=device)
    except Exception as e:  # damaged weights, a config this code can not build, ...
        raise DemoInputError(f"could not load the bundle {p}: {type(e).__name__}: {e}") from e


class DemoBackend:
    """What the UI calls: validates input, keeps per-session history, serialises generation.

    Kept apart from the Gradio layout so tests can drive it directly.
    """

    def __init__(
        self,
        generator: Any | None,
        *,
        out_dir: str | Path = DEFAULT_OUT,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
        device: str = "cpu",
        bundle_error: str | None = None,
        bundle_path: str | Path | None = None,
        allowed_bundles: Sequence[str | Path] = (),
    ) -> None:
        self.generator = generator
        self.out_dir = Path(out_dir)
        self.max_prompt_chars = int(max_prompt_chars)
        self.device = device
        self.bundle_error = bundle_error
        # what "Load bundle" may load: the bundle the demo started with, and folders in or under
        # allowed_bundles (--allow-bundles); both resolved once, here
        started = bundle_path if bundle_path not in (None, "") else getattr(generator, "bundle", None)
        self.started_bundle = _real(str(started).strip()) if started not in (None, "") else None
        self.allowed_bundles = [r for r in (_real(p) for p in allowed_bundles) if r is not None]
        self.lock = threading.Lock()  # one generation (or bundle swap) at a time: the model is shared

    # --- the bundle ----------------------------------------------------------------------------
    def describe(self) -> str:
        if self.generator is None:
            return f"No model loaded: {self.bundle_error or 'give a stage bundle folder below'}"
        stage = getattr(self.generator, "stage", None)
        text = f"Model: {self.generator.bundle}" + (f" (stage {stage})" if stage and stage > 0 else "")
        untrained = getattr(self.generator, "untrained", None)
        if untrained:
            text += f"; no trained output projector for {', '.join(untrained)} (those outputs are noise)"
        return text

    def refusal(self) -> str:
        """The one message for a folder the demo may not load: it never depends on the path asked for."""
        started = (
            f"the bundle it was started with ({self.started_bundle})"
            if self.started_bundle
            else ("no bundle (it was started without one)")
        )
        if not self.allowed_bundles:
            return (
                f"refused: this demo loads only {started}; restart it with --allow-bundles DIR to let the "
                f"page load stage bundles from DIR"
            )
        return (
            f"refused: this demo loads only {started} and stage bundles in "
            f"{', '.join(map(str, self.allowed_bundles))} (--allow-bundles)"
        )

    def allowed_path(self, path: str | None) -> Path:
        """``path`` resolved (symlinks followed) if the demo may load it, else ``DemoInputError``
        with :meth:`refusal`, the same text whether the path exists or not."""
        text = str(path or "").strip()
        if not text:
            raise DemoInputError("no bundle folder given (train one with: python train.py -m stage=1,2,3)")
        real = _real(text)
        if real is not None and (
            real == self.started_bundle or any(real.is_relative_to(root) for root in self.allowed_bundles)
        ):
            return real
        raise DemoInputError(self.refusal())

    def load_bundle(self, path: str) -> str:
        """Swap in another bundle (one the demo may load: :meth:`allowed_path`); on failure the
        current model stays and the reason is returned."""
        with self.lock:
            try:
                gen = load_generator(self.allowed_path(path), self.device)
            except DemoInputError as e:
                return _status(str(e), "error")
            self.generator, self.bundle_error = gen, None
        return _status(f"bundle loaded. {self.describe()}", "ok")

    # --- one chat turn --------------------------------------------------------------------------
    def validate(self, prompt: str | None, uploads: dict[str, str | None]) -> tuple[str, list[str]]:
        """The stripped prompt and the attached files in registry order; ``DemoInputError`` if bad."""
        from nextgpt.generate import modality_of_file

        prompt = (prompt or "").strip()
        if not prompt:
            raise DemoInputError("the prompt is empty: type a question or a request")
        if len(prompt) > self.max_prompt_chars:
            raise DemoInputError(
                f"the prompt is {len(prompt)} characters long; the limit is "
                f"{self.max_prompt_chars} (--max-prompt-chars)"
            )
        media = []
        for box, path in uploads.items():
            if not path:
                continue
            name = Path(path).name
            if not Path(path).is_file():
                raise DemoInputError(f"the {box} file {name} is gone: upload it again")
            try:
                kind = modality_of_file(path)
            except ValueError:
                exts = " ".join(modality_registry.get(box).extensions)
                raise DemoInputError(
                    f"{name}: unsupported {box} file type {Path(path).suffix or '(none)'!r}; "
                    f"the {box} box takes {exts}"
                ) from None
            if kind != box:
                raise DemoInputError(
                    f"{name} holds {kind}, not {box}: put it in the {kind.capitalize()} box, "
                    f"not the {box.capitalize()} box"
                )
            media.append(str(path))
        return prompt, media

    def answer(
        self,
        prompt: str | None,
        uploads: dict[str, str | None],
        state: ChatState,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> tuple[ChatState, Any]:
        """Run one turn; returns the new state (the old one is untouched) and the result."""
        if self.generator is None:
            raise DemoInputError(
                f"no model is loaded ({self.bundle_error or 'no bundle given'}): "
                "load a stage bundle folder in the Bundle panel"
            )
        prompt, media = self.validate(prompt, uploads)
        if not 1 <= int(max_new_tokens) <= 4096:
            raise DemoInputError(f"max new tokens must be between 1 and 4096, not {max_new_tokens}")
        if float(temperature) < 0:
            raise DemoInputError(f"temperature must be >= 0, not {temperature}")
        full = with_placeholders(prompt, media)
        session = state.session or uuid.uuid4().hex[:12]
        out = self.out_dir / session / f"turn{len(state.turns)}"
        with self.lock:
            res = self.generator.chat(
                full,
                media,
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                seed=int(seed),
                out_dir=out,
                history=list(state.turns),
                history_media=list(state.media),
            )
        files = [str(f) for name in modality_registry.names() for f in res.files.get(name, [])]
        new = ChatState(
            session, [*state.turns, (full, res.text)], [*state.media, *media], [*state.files, *files]
        )
        return new, res


def _error_text(e: BaseException) -> str:
    """The user-facing text of an exception: input errors as they are, anything else with its type."""
    from nextgpt.bundles import BundleError

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
        app.backend = backend  # type: ignore[attr-defined]  # for tests and embedding
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
                    _status("" if generator else backend.describe(), "info" if generator else "error"),
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
                return (skip, skip, skip, *[skip] * len(names), _status(_error_text(e), "error"), skip)
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
            return (messages, new, "", *[None] * len(names), _status(done, "ok"), new.files or None)

        def reset() -> tuple:
            return [], ChatState(), "", *[None] * len(names), _status("new conversation", "info"), None

        def load_bundle(path: str) -> tuple[str, str]:
            try:
                msg = backend.load_bundle(path)
            except Exception as e:  # a handler never raises: the page shows the reason
                log.exception("demo: loading a bundle failed")
                msg = _status(_error_text(e), "error")
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
        import torch

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
