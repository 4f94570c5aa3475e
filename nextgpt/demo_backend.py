"""The web demo's model and session side (:mod:`nextgpt.demo` builds the page around it): loading a
stage bundle, the folders a visitor may load one from, checking each request, and one chat turn
with its history. Kept apart from the Gradio layout so tests can drive it directly, without gradio.
"""

from __future__ import annotations

import html
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextgpt import modality as modality_registry
from nextgpt.bundles import CONFIG, WEIGHTS
from nextgpt.generate import Generator, modality_of_file, with_placeholders

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


def status_html(message: str, kind: str = "info") -> str:
    """Status-box HTML; the message is escaped (it may hold paths, placeholders, user text)."""
    icon = {"error": "\u26a0 Error: ", "ok": "\u2713 ", "info": ""}[kind]
    colour = {"error": "#b91c1c", "ok": "#15803d", "info": "inherit"}[kind]
    return (
        f'<div class="nextgpt-status nextgpt-status-{kind}" style="color:{colour};padding:4px 0">'
        f"{icon}{html.escape(message)}</div>"
    )


def check_bundle_dir(path: str | Path) -> Path:
    """Refuse a missing folder or one that is not a stage bundle before any weight loads."""
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
                return status_html(str(e), "error")
            self.generator, self.bundle_error = gen, None
        return status_html(f"bundle loaded. {self.describe()}", "ok")

    # --- one chat turn --------------------------------------------------------------------------
    def validate(self, prompt: str | None, uploads: dict[str, str | None]) -> tuple[str, list[str]]:
        """The stripped prompt and the attached files in registry order; ``DemoInputError`` if bad."""
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
