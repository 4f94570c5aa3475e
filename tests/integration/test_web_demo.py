"""The web demo end to end: train the tiny demo bundle, serve ``python -m nextgpt.demo``, drive it
in headless Chromium (Playwright on Debian's /usr/bin/chromium).

The browser test is what a user does: attach a real sample image and ask about it (the page must
show the model's own answer), ask for an image (a generated <img> must appear), then send bad
input (empty prompt, corrupt file, missing bundle folder, a folder outside --allow-bundles) and see
each message while the app keeps answering. The backend tests check the same rules without a
browser, that the bundle box loads only the started bundle and folders under --allow-bundles (with
one refusal, whether the path exists or not), and that follow-up turns pass the history.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import free_port, served_process
from tests.conftest import DEMO_ENV

pytestmark = pytest.mark.slow

# launch flags that work in this sandbox (no GPU, no sandboxing, no network side traffic)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGE_REQUEST = "Please make an image of a red circle at the top left on a black background"
ENV = {**DEMO_ENV, "GRADIO_ANALYTICS_ENABLED": "False"}
SCREENSHOT_COPY = Path("/tmp/nextgpt_web_demo.png")


def chromium_path() -> Path | None:
    """Debian's chromium ($NEXTGPT_CHROMIUM overrides); None when it is not installed."""
    found = os.environ.get("NEXTGPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return Path(found) if Path(found).is_file() else None


def sample_images(root: Path, limit: int = 3) -> list[Path]:
    """Images named by cc3m/cc3m.json that exist under cc3m/images/ (no hard-coded names)."""
    index = root / "cc3m" / "cc3m.json"
    if not index.is_file():
        pytest.skip(f"{index} not found in the real sample")
    found = [
        root / "cc3m" / "images" / e["image_name"]
        for e in json.loads(index.read_text())
        if e.get("image_name")
    ]
    found = [p for p in found if p.is_file()][:limit]
    if not found:
        pytest.skip(f"no image named in {index} exists under {root / 'cc3m' / 'images'}")
    return found


def expect_text(locator, text: str, timeout: float = 30.0) -> None:
    """Wait until ``locator``'s text contains ``text``, ignoring all whitespace.

    Browsers differ in the spaces they render between elements: the same upload shows as
    ``photo.jpg`` in one Chromium and ``photo .jpg`` (stem and extension in two elements) in
    another. What the test asserts is the text, not the layout."""
    want = "".join(text.split())
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        try:
            shown = locator.inner_text(timeout=1_000)
        except Exception:  # not attached yet, or re-rendered while read
            pass
        if want in "".join(shown.split()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} did not appear within {timeout:.0f} s; the element shows {shown!r}")
        time.sleep(0.2)


# --- fixtures: the trained demo bundle and its generator come from tests/conftest.py ------------
@pytest.fixture(scope="module")
def server(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """``python -m nextgpt.demo`` on a free port, as a user starts it, letting the page load bundles
    from one folder (--allow-bundles); yields (url, out dir, that folder)."""
    work = tmp_path_factory.mktemp("web_demo_app")
    out, allowed, port = work / "out", work / "bundles", free_port()
    allowed.mkdir()
    url = f"http://127.0.0.1:{port}/"
    with served_process(
        [
            "-m",
            "nextgpt.demo",
            "--bundle",
            str(demo_bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--out",
            str(out),
            "--allow-bundles",
            str(allowed),
        ],
        url,
        work / "server.log",
        ENV,
        name="demo server",
    ):
        yield url, out, allowed


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium through Playwright (never `playwright install`: no download here)."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the test extra (playwright) is not installed"
    )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(exe), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


# --- the browser test -----------------------------------------------------------------------------
def fill_and_commit(box, value: str, tries: int = 5) -> None:
    """Type ``value`` into a Gradio textbox and leave it (Tab), as a person does before clicking.

    Under CI load the accordion that holds the box can still be mounting when the first fill lands,
    and the mount resets the box to its initial value (seen twice in CI); so fill again until the
    value holds, and fail with the value seen when it never does.
    """
    from playwright.sync_api import expect

    box.wait_for(state="visible", timeout=30_000)
    for attempt in range(tries):
        box.fill(value)
        box.press("Tab")  # Gradio commits the value on change/blur
        try:
            expect(box).to_have_value(value, timeout=3_000)
            box.page.wait_for_timeout(500)  # and it still holds a moment later
            expect(box).to_have_value(value, timeout=3_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise


@pytest.mark.real_data
@pytest.mark.one_sample_folder
def test_web_demo_in_headless_chromium(browser, server, generator, sample_root: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    url, out, allowed = server
    image = sample_images(sample_root, limit=1)[0]
    expected = generator.chat("Describe this image.", [image], max_new_tokens=64).text
    assert expected.strip(), "the tiny model gave an empty answer; nothing to look for on the page"
    broken = tmp_path / f"broken_{image.name}"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG " * 8)

    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#prompt textarea", timeout=60_000)
    bot = page.locator("#chat .message-row.bot-row")  # one row per answer (text + media items inside)
    status = page.locator("#status")

    def send(text: str) -> None:
        page.fill("#prompt textarea", text)
        page.click("#send")

    def attach(path: Path) -> None:
        page.locator("#image-upload input[type=file]").set_input_files(str(path))
        expect_text(page.locator("#image-upload"), path.name, timeout=30)

    # 1. a real cc3m image + a question: the page shows the model's own answer
    attach(image)
    send("Describe this image.")
    expect(bot).to_have_count(1, timeout=90_000)
    expect_text(status, "answered", timeout=10)
    shown = " ".join(bot.last.inner_text().split())
    assert " ".join(expected.split()) in shown, (expected, shown)
    expect(page.locator("#chat .user-row img")).to_have_count(1)  # the attached image, inline

    # 2. a new conversation asking for an image: a generated <img> in the answer, and a download link
    page.click("#clear")
    expect(bot).to_have_count(0, timeout=10_000)
    send(IMAGE_REQUEST)
    expect(bot).to_have_count(1, timeout=120_000)
    generated = bot.last.locator("img[src*='image_0.png']")
    expect(generated).to_have_count(1, timeout=30_000)
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=generated.element_handle(), timeout=30_000
    )
    expect(page.locator("#downloads a[href*='image_0.png']")).to_have_count(1, timeout=10_000)
    assert list(out.rglob("image_0.png")), f"no generated image under {out}"

    # 3. bad input: each gives a message in the status box, the conversation survives
    send("")
    expect_text(status, "the prompt is empty", timeout=30)
    expect(bot).to_have_count(1)
    page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
    shutil.copyfile(tmp_path / "web_demo.png", SCREENSHOT_COPY)

    attach(broken)
    send("Describe this image.")
    expect_text(status, broken.name, timeout=60)
    expect_text(status, "Error", timeout=1)
    expect(bot).to_have_count(1)

    if not page.locator("#bundle textarea").is_visible():
        page.locator("#bundle-panel").get_by_text("Bundle", exact=True).click()  # open the accordion
    box = page.locator("#bundle textarea")
    fill_and_commit(box, str(allowed / "no_such_bundle"))  # allowed, but not there: said so
    page.click("#load-bundle")
    expect_text(status, "does not exist", timeout=30)
    fill_and_commit(box, str(tmp_path))  # an existing folder outside --allow-bundles: refused
    page.click("#load-bundle")
    expect_text(status, "refused", timeout=30)

    # 4. still up and answering with the model it had
    page.click("#clear")
    expect(bot).to_have_count(0, timeout=10_000)
    attach(image)
    send("Describe this image.")
    expect(bot).to_have_count(1, timeout=90_000)
    assert " ".join(expected.split()) in " ".join(bot.last.inner_text().split())
    assert not page_errors, page_errors
    page.close()


# --- the backend without a browser ----------------------------------------------------------------
def test_backend_refuses_bad_input_with_clear_messages(generator, tmp_path: Path) -> None:
    from nextgpt.demo_backend import ChatState, DemoBackend, DemoInputError

    backend = DemoBackend(generator, out_dir=tmp_path / "out", max_prompt_chars=40)
    state = ChatState()
    none = {"image": None, "audio": None, "video": None}
    with pytest.raises(DemoInputError, match="prompt is empty"):
        backend.answer("   ", none, state)
    with pytest.raises(DemoInputError, match="41 characters long; the limit is 40"):
        backend.answer("x" * 41, none, state)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DemoInputError, match=r"notes.txt: unsupported image file type '.txt'"):
        backend.answer("Describe this image.", {**none, "image": str(text)}, state)
    png = tmp_path / "pic.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(png)
    with pytest.raises(DemoInputError, match="pic.png holds image, not audio: put it in the Image box"):
        backend.answer("What is this sound?", {**none, "audio": str(png)}, state)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="corrupt.png"):
        backend.answer("Describe this image.", {**none, "image": str(corrupt)}, state)
    assert state == ChatState(), "a refused request must leave the conversation as it was"


def test_bundle_errors_are_messages_not_crashes(generator, tmp_path: Path) -> None:
    from nextgpt.demo import build_app
    from nextgpt.demo_backend import ChatState, DemoBackend, DemoInputError, load_generator

    with pytest.raises(DemoInputError, match="does not exist"):
        load_generator(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DemoInputError, match="is not a stage bundle: it has no trainable.safetensors / config.yaml"
    ):
        load_generator(tmp_path / "empty")

    backend = DemoBackend(generator, out_dir=tmp_path / "out", allowed_bundles=[tmp_path])
    msg = backend.load_bundle(str(tmp_path / "empty"))
    assert "Error" in msg and "not a stage bundle" in msg
    assert backend.generator is generator, "a failed load keeps the model that was serving"

    idle = DemoBackend(None, bundle_error="bundle folder /x does not exist")
    with pytest.raises(DemoInputError, match="no model is loaded .*does not exist"):
        idle.answer("hello", {}, ChatState())
    app = build_app(None, bundle_error="bundle folder /x does not exist", out_dir=tmp_path / "out")
    assert "does not exist" in app.backend.describe()


def test_bundle_box_loads_only_the_started_bundle_and_allowed_folders(
    generator, demo_bundle: Path, tmp_path: Path
) -> None:
    import html

    from nextgpt.demo_backend import DemoBackend, DemoInputError

    outside = tmp_path / "outside"  # an existing folder that even looks like a bundle
    outside.mkdir()
    for f in demo_bundle.iterdir():
        shutil.copy(f, outside / f.name)
    missing = tmp_path / "no_such_folder"
    allowed = tmp_path / "allowed"
    (allowed / "empty").mkdir(parents=True)
    shutil.copytree(demo_bundle, allowed / "stage3")
    (allowed / "escape").symlink_to(
        outside, target_is_directory=True
    )  # inside by name, outside when resolved

    def refusal(backend: DemoBackend, path) -> str:
        with pytest.raises(DemoInputError) as info:
            backend.allowed_path(str(path))
        msg = backend.load_bundle(str(path))
        assert "Error" in msg and html.escape(str(info.value)) in msg
        assert str(path) not in str(info.value) and "exist" not in str(info.value)
        return str(info.value)

    # no --allow-bundles: the started bundle only; an existing and a missing folder read the same
    fixed = DemoBackend(generator, out_dir=tmp_path / "out")
    texts = {refusal(fixed, p) for p in (outside, missing, "/etc", tmp_path, allowed / "stage3")}
    assert len(texts) == 1, texts
    assert texts.pop().startswith("refused: this demo loads only the bundle it was started with")
    assert fixed.generator is generator, "a refused load keeps the model that was serving"
    assert (
        fixed.allowed_path(f"{demo_bundle}/") == demo_bundle.resolve()
    )  # the started bundle, as typed or not

    # --allow-bundles DIR: bundles in DIR load; paths that leave it (.., a symlink) are refused alike
    open_ = DemoBackend(generator, out_dir=tmp_path / "out", allowed_bundles=[allowed])
    texts = {
        refusal(open_, p)
        for p in (
            outside,
            missing,
            allowed / "escape",
            allowed / ".." / "outside",
            allowed / "escape" / "nothing",
        )
    }
    assert len(texts) == 1 and "(--allow-bundles)" in texts.pop()
    assert "does not exist" in open_.load_bundle(str(allowed / "missing"))
    assert "not a stage bundle" in open_.load_bundle(str(allowed / "empty"))
    assert open_.generator is generator
    msg = open_.load_bundle(str(allowed / "stage3"))
    assert "bundle loaded" in msg, msg
    assert open_.generator is not generator and Path(open_.generator.bundle) == (allowed / "stage3").resolve()


def test_allow_bundles_flag_and_the_page_without_it(generator, tmp_path: Path, capsys) -> None:
    from nextgpt.demo import build_app, parse_args

    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    assert parse_args(["--bundle", "x"]).allow_bundles == []
    args = parse_args(["--bundle", "x", "--allow-bundles", f"{a},{b}", "--allow-bundles", str(c)])
    assert args.allow_bundles == [a, b, c]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--bundle", "x", "--allow-bundles", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "--allow-bundles" in capsys.readouterr().err

    def bundle_ui(app) -> tuple[dict, str]:
        props = {c["props"].get("elem_id"): c["props"] for c in app.config["components"]}
        return props["bundle"], props["bundle-note"]["value"]

    box, note = bundle_ui(build_app(generator, out_dir=tmp_path / "out"))
    assert (
        box["interactive"] is False and "Loading another bundle is off" in note and "--allow-bundles" in note
    )
    box, note = bundle_ui(build_app(generator, out_dir=tmp_path / "out", allowed_bundles=[a]))
    assert box["interactive"] is True and str(a.resolve()) in note


@pytest.mark.real_data
@pytest.mark.one_sample_folder
def test_follow_up_turns_carry_history_and_media(generator, sample_root: Path, tmp_path: Path) -> None:
    from nextgpt.demo_backend import ChatState, DemoBackend

    calls: list[dict] = []

    class Spy:
        """The real generator, recording what each turn passes."""

        bundle, stage = generator.bundle, getattr(generator, "stage", 3)

        def chat(self, prompt, media=(), history=(), *, history_media=(), **kw):
            calls.append(
                {
                    "prompt": prompt,
                    "media": list(media),
                    "history": list(history),
                    "history_media": list(history_media),
                }
            )
            return generator.chat(prompt, media, history, history_media=history_media, **kw)

    image = str(sample_images(sample_root, limit=1)[0])
    backend = DemoBackend(Spy(), out_dir=tmp_path / "out")
    s1, r1 = backend.answer("What is in this picture?", {"image": image}, ChatState(), max_new_tokens=24)
    s2, r2 = backend.answer(IMAGE_REQUEST, {}, s1, max_new_tokens=48)
    assert calls[0]["prompt"] == "<image>\nWhat is in this picture?" and calls[0]["media"] == [image]
    assert calls[1]["history"] == [("<image>\nWhat is in this picture?", r1.text)]
    assert calls[1]["history_media"] == [image] and calls[1]["media"] == []
    assert s2.turns[-1] == (IMAGE_REQUEST, r2.text) and s2.media == [image] and s1.session == s2.session
