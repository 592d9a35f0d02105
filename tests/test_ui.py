"""The browser page at /ui, driven in a real headless Chromium against the real `bentoml serve`.

The server is conftest.py's session fixture `server` (a real `bentoml serve` on a free port); the uploaded
digits are real MNIST test digits from its `mnist_digits` fixture.

Chromium is Debian's `chromium` package (never a browser downloaded by Playwright); `make test` installs it.
Screenshots land in test-artifacts/ui-*.png for a person to look at.
"""

from __future__ import annotations

import base64
import itertools
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import (
    ConsoleMessage,
    FilePayload,
    Page,
    Playwright,
    Request,
    Route,
    expect,
    sync_playwright,
)

if TYPE_CHECKING:
    from conftest import Digit, Server

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

# Offline machines, running as root: no sandbox (root), no GPU, and nothing that phones home on start-up.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PREDICT_TIMEOUT_MS = 20_000  # the first request also warms the model up
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}  # an iPhone 12-15 sized screen

PERCENT = re.compile(r"^\d{1,3}(\.\d)?%$")

pytestmark = pytest.mark.slow


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if Path(path).exists():
        return path
    message = "Debian's chromium is not installed (apt-get install -y chromium; `make test` does this)"
    if os.environ.get("CI"):
        pytest.fail(message)  # in CI the browser tests must run, never quietly skip
    pytest.skip(message)


@pytest.fixture(scope="module")
def api_url(server: Server) -> str:
    return server.url


@pytest.fixture(scope="module")
def ui_url(api_url: str) -> str:
    return f"{api_url}/ui/"


def _first(digits: list[Digit], label: int) -> Digit:
    return next(digit for digit in digits if digit.label == label)


def _file(digit: Digit) -> FilePayload:
    return {"name": digit.name, "mimeType": "image/png", "buffer": digit.png}


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture
def open_page(playwright: Playwright, tmp_path: Path, ui_url: str) -> Iterator[Callable[..., Page]]:
    """Opens the page in a fresh Chromium with an empty profile; fails the test on any JS or console error."""
    executable = _chromium()
    contexts = []
    problems: list[str] = []

    def _open(viewport: dict[str, int] = DESKTOP, phone: bool = False, allow: tuple[str, ...] = ()) -> Page:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(contexts)}"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=viewport,
            device_scale_factor=2,
            is_mobile=phone,
            has_touch=phone,
        )
        contexts.append(context)
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(PREDICT_TIMEOUT_MS)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error" and not any(text in message.text for text in allow):
                problems.append(f"console error: {message.text}")

        def on_request(request: Request) -> None:
            # Everything the page loads must come from the service itself: no CDN, no web fonts. (The page's
            # Content-Security-Policy would block such a load; the console check above reports that too.)
            url = urlsplit(request.url)
            if url.scheme in ("http", "https") and url.netloc != urlsplit(ui_url).netloc:
                problems.append(f"external request: {request.url}")

        page.on("console", on_console)
        page.on("request", on_request)
        page.goto(ui_url)
        expect(page.locator("#bars li")).to_have_count(10)
        return page

    yield _open
    for context in contexts:
        context.close()
    assert not problems, problems


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _pad_box(page: Page) -> dict[str, float]:
    box = page.locator("#pad").bounding_box()
    assert box is not None
    return box


def _at(box: dict[str, float], fx: float, fy: float) -> tuple[float, float]:
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def _mouse_stroke(page: Page, points: list[tuple[float, float]]) -> None:
    """One pen-down-to-pen-up stroke through `points`, given as fractions of the canvas."""
    box = _pad_box(page)
    page.mouse.move(*_at(box, *points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*_at(box, *point), steps=12)
    page.mouse.up()


def _touch_stroke(page: Page, points: list[tuple[float, float]]) -> None:
    """The same with a finger: real touch input through the DevTools protocol, as a phone sends it."""
    box = _pad_box(page)
    cdp = page.context.new_cdp_session(page)

    def touch(kind: str, fx: float, fy: float) -> None:
        x, y = _at(box, fx, fy)
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})

    touch("touchStart", *points[0])
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        for i in range(1, 13):
            touch("touchMove", x0 + (x1 - x0) * i / 12, y0 + (y1 - y0) * i / 12)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


ONE = [(0.52, 0.18), (0.48, 0.82)]
SEVEN = [[(0.25, 0.22), (0.75, 0.22)], [(0.75, 0.22), (0.45, 0.84)]]  # two strokes: bar, then stem


def _expect_prediction(page: Page, digit: int, sure: bool = False) -> None:
    """The page shows `digit` with its status in words: "This is a 7." (or, unless `sure`, "Not sure: maybe a 7.")."""
    expect(page.locator("#result")).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#digit")).to_have_text(str(digit))
    words = rf"This is a {digit}\." if sure else rf"(This is a {digit}\.|Not sure: maybe a {digit}\.)"
    expect(page.locator("#verdict")).to_have_text(re.compile(f"^{words}$"))
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#bars li")).to_have_count(10)
    expect(page.locator("#bars li.top")).to_have_attribute("data-digit", str(digit))
    expect(page.locator("#confidence")).to_have_text(PERCENT)
    # The 28x28 image the model saw, decoded by the browser from the API's base64 PNG.
    expect(page.locator("#seen")).to_have_js_property("naturalWidth", 28)
    widths = page.locator("#bars .bar-fill").evaluate_all("els => els.map(e => parseFloat(e.style.width))")
    assert len(widths) == 10 and 99 <= sum(widths) <= 101, widths  # the bars show probabilities summing to 1
    assert max(widths) == widths[digit]


def _record_predict_bodies(page: Page) -> list[bytes]:
    """Bodies of the page's POST /predict requests. Routed, because only an intercepted request exposes a
    multipart body with a file in it (microsoft/playwright#24077)."""
    bodies: list[bytes] = []

    def record(route: Route) -> None:
        bodies.append(route.request.post_data_buffer or b"")
        route.continue_()

    page.route("**/predict", record)
    return bodies


def test_drawn_one_is_read_as_one(open_page: Callable[..., Page]) -> None:
    page = open_page()
    _mouse_stroke(page, ONE)
    _expect_prediction(page, 1)


def test_two_stroke_seven_is_predicted_once_after_the_last_stroke(open_page: Callable[..., Page]) -> None:
    page = open_page()
    posted = _record_predict_bodies(page)
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        for stroke in SEVEN:
            _mouse_stroke(page, stroke)
    assert answer.value.status == 200
    _expect_prediction(page, 7)
    page.wait_for_timeout(800)  # longer than the debounce: a second request would have gone out by now
    assert len(posted) == 1, "the page should wait for the pause after the last stroke before predicting"
    body = posted[0]
    assert b'name="return_image"\r\n\r\ntrue' in body
    assert b"Content-Type: image/png" in body  # the canvas itself, as PNG
    _screenshot(page, "desktop")


HASH = [  # "#": four strokes, no digit
    [(0.38, 0.15), (0.32, 0.85)],
    [(0.66, 0.15), (0.60, 0.85)],
    [(0.15, 0.38), (0.85, 0.38)],
    [(0.15, 0.62), (0.85, 0.62)],
]


def test_drawn_non_digit_is_said_to_be_no_digit(open_page: Callable[..., Page]) -> None:
    page = open_page()
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        for stroke in HASH:
            _mouse_stroke(page, stroke)
    assert answer.value.json()["status"] == "not_a_digit"
    expect(page.locator("#result")).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#verdict")).to_have_text("This does not look like a digit.")
    expect(page.locator("#digit")).to_have_text("?")
    expect(page.locator("#bars li")).to_have_count(10)  # the probabilities are still shown
    _screenshot(page, "not-a-digit")


def _arc(
    cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 16
) -> list[tuple[float, float]]:
    return [
        (cx + rx * math.cos(start + (end - start) * k / n), cy + ry * math.sin(start + (end - start) * k / n))
        for k in range(n + 1)
    ]


FACE = [  # what people draw to test a digit reader (issue 27): a circle, two eyes, a smile
    _arc(0.5, 0.5, 0.34, 0.36, -1.4, 2 * math.pi - 1.3),
    [(0.38, 0.38), (0.385, 0.41)],
    [(0.62, 0.38), (0.615, 0.41)],
    _arc(0.5, 0.56, 0.17, 0.12, 0.3, math.pi - 0.3, n=8),
]
HEART = [  # two strokes from the dip at the top, each over one lobe and down to the point
    [*_arc(0.36, 0.38, 0.14, 0.14, 0, -math.pi), (0.5, 0.8)],
    [*_arc(0.64, 0.38, 0.14, 0.14, math.pi, 2 * math.pi), (0.5, 0.8)],
]


@pytest.mark.parametrize("drawing", [FACE, HEART], ids=["face", "heart"])
def test_drawn_shapes_are_not_answered_as_sure_digits(open_page: Callable[..., Page], drawing) -> None:
    """A drawn face was answered 0 with status ok by the 2026-12-02 CNN; no drawing that is not a digit should be."""
    page = open_page()
    with page.expect_response(lambda r: r.url.endswith("/predict")) as answer:
        for stroke in drawing:
            _mouse_stroke(page, stroke)
    assert answer.value.json()["status"] in ("not_a_digit", "uncertain"), answer.value.json()
    expect(page.locator("#result")).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#verdict")).not_to_have_text(re.compile(r"^This is a \d\.$"))


NUMBER_17 = [  # a 1 on the left, a two-stroke 7 on the right
    [(0.24, 0.3), (0.22, 0.7)],
    [(0.52, 0.3), (0.8, 0.3)],
    [(0.8, 0.3), (0.62, 0.72)],
]


def test_a_drawn_number_is_read_with_boxes(open_page: Callable[..., Page]) -> None:
    # /predict answers a number with 422 pointing to /read; Chromium logs every 4xx answer to the console.
    page = open_page(allow=("status of 422",))
    with page.expect_response(lambda r: r.url.endswith("/read")) as answer:
        for stroke in NUMBER_17:
            _mouse_stroke(page, stroke)
    body = answer.value.json()
    assert answer.value.status == 200 and body["text"] == "17", body.get("text")
    expect(page.locator("#result")).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(page.locator("#digit")).to_have_text("17")
    expect(page.locator("#verdict")).to_have_text(re.compile(r"^This reads as 17"))
    expect(page.locator("#number-digits li")).to_have_count(2)
    expect(page.locator("#number-digits li").first).to_have_text(re.compile(r"^1 · \d+(\.\d)?%$"))
    expect(page.locator("#bars")).to_be_hidden()
    # One box per digit, over the drawing: the 1's box lies in the left half, the 7's in the right.
    expect(page.locator("#boxes .box")).to_have_count(2)
    lefts = page.locator("#boxes .box").evaluate_all("els => els.map(e => parseFloat(e.style.left))")
    assert lefts[0] < 40 < lefts[1], lefts
    _screenshot(page, "number")
    # A single digit afterwards shows the probabilities again and no boxes.
    page.locator("#clear").click()
    _mouse_stroke(page, ONE)
    _expect_prediction(page, 1)
    expect(page.locator("#boxes .box")).to_have_count(0)


def test_clear_resets_canvas_and_result(open_page: Callable[..., Page]) -> None:
    page = open_page()
    _mouse_stroke(page, ONE)
    _expect_prediction(page, 1)
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#empty")).to_be_visible()
    ink = page.evaluate(
        """() => {
            const pad = document.getElementById("pad");
            const rgba = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data;
            return rgba.filter((value, i) => i % 4 === 0 && value > 0).length;
        }"""
    )
    assert ink == 0


def test_black_on_white_drawing_is_read_too(open_page: Callable[..., Page]) -> None:
    page = open_page()
    page.get_by_role("button", name="Black on white").click()
    posted = _record_predict_bodies(page)
    _mouse_stroke(page, ONE)
    _expect_prediction(page, 1)
    # What was sent is what the canvas shows: dark ink on a white background (the service fixes polarity).
    corner = page.evaluate(
        "() => Array.from(document.getElementById('pad').getContext('2d').getImageData(2, 2, 1, 1).data)"
    )
    assert corner == [255, 255, 255, 255]
    assert len(posted) == 1


def test_picked_mnist_file_shows_its_label(open_page: Callable[..., Page], mnist_digits: list[Digit]) -> None:
    page = open_page()
    page.locator("#file").set_input_files(_file(_first(mnist_digits, 7)))
    _expect_prediction(page, 7, sure=True)


def test_dropped_mnist_file_shows_its_label(open_page: Callable[..., Page], mnist_digits: list[Digit]) -> None:
    two = _first(mnist_digits, 2)
    page = open_page()
    page.evaluate(
        """({b64, name}) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: "image/png"}));
            const pad = document.getElementById("pad");
            for (const type of ["dragenter", "dragover", "drop"]) {
                pad.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
            }
        }""",
        {"b64": base64.b64encode(two.png).decode(), "name": two.name},
    )
    _expect_prediction(page, 2, sure=True)


def test_api_error_is_shown_in_words(open_page: Callable[..., Page], api_url: str, mnist_digits: list[Digit]) -> None:
    notes = b"shopping list: milk, eggs\n"
    # The page must show the API's own explanation, so ask the API what it says about this file.
    direct = requests.post(f"{api_url}/predict", files={"image": ("notes.txt", notes, "text/plain")}, timeout=30)
    assert 400 <= direct.status_code < 500
    message = direct.json()["error"]
    assert message

    page = open_page(allow=("Failed to load resource",))  # Chromium logs every 4xx answer to the console
    page.locator("#file").set_input_files({"name": "notes.txt", "mimeType": "text/plain", "buffer": notes})
    error = page.get_by_role("alert")
    expect(error).to_be_visible(timeout=PREDICT_TIMEOUT_MS)
    expect(error).to_contain_text(message)
    expect(page.locator("#result")).to_be_hidden()
    _screenshot(page, "error")

    # A good input afterwards replaces the error with a result.
    page.locator("#file").set_input_files(_file(_first(mnist_digits, 7)))
    _expect_prediction(page, 7)


def test_model_picker_lists_loaded_models_and_sends_the_choice(
    open_page: Callable[..., Page], api_url: str, mnist_digits: list[Digit]
) -> None:
    card = requests.get(f"{api_url}/model", timeout=30).json()
    names = [model["name"] for model in card["models"]]

    page = open_page()
    picker = page.locator("#model")
    expect(picker.locator("option")).to_have_count(len(names))
    assert picker.locator("option").evaluate_all("options => options.map(o => o.value)") == names
    expect(picker).to_have_value(card["default"])
    posted = _record_predict_bodies(page)
    page.locator("#file").set_input_files(_file(_first(mnist_digits, 7)))
    _expect_prediction(page, 7)
    assert f'name="model"\r\n\r\n{card["default"]}'.encode() in posted[0]

    # Picking another model classifies the same input again with it (with one model: the same one again).
    other = names[-1]
    with page.expect_response(lambda r: r.url.endswith("/predict")):
        picker.select_option(other)
    expect(page.locator("#model-line")).to_contain_text(other)
    # ...and names the version that answered (the model repository may serve several).
    expect(page.locator("#model-line")).to_contain_text(
        next(m["version"] for m in card["models"] if m["name"] == other)
    )
    _expect_prediction(page, 7)
    assert f'name="model"\r\n\r\n{other}'.encode() in posted[-1]


def test_phone_layout_and_touch_drawing(open_page: Callable[..., Page]) -> None:
    page = open_page(viewport=PHONE, phone=True)
    # Nothing wider than the screen (no sideways scrolling), and a canvas big enough for a thumb.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    pad = _pad_box(page)
    assert pad["x"] >= 0 and pad["x"] + pad["width"] <= PHONE["width"]
    assert pad["width"] >= 0.7 * PHONE["width"]
    _touch_stroke(page, ONE)
    _expect_prediction(page, 1)
    # The answer shows up where the person is looking: no scrolling needed after drawing.
    expect(page.locator("#digit")).to_be_in_viewport(ratio=1)
    expect(page.locator("#confidence")).to_be_in_viewport(ratio=1)
    # The cards stack: the result sits below the drawing pad, not squeezed beside it.
    result = page.locator(".result-card").bounding_box()
    assert result is not None and result["y"] >= pad["y"] + pad["height"]
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    _screenshot(page, "phone")


def test_ui_is_served_with_a_strict_policy(api_url: str) -> None:
    bare = requests.get(f"{api_url}/ui", timeout=30)
    assert bare.status_code == 200 and bare.url.endswith("/ui/")  # /ui redirects to /ui/ so relative URLs work
    page = requests.get(f"{api_url}/ui/", timeout=30)
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("static/app.js", "javascript"), ("static/style.css", "text/css")):
        answer = requests.get(f"{api_url}/ui/{asset}", timeout=30)
        assert answer.status_code == 200 and kind in answer.headers["content-type"], asset
    assert requests.get(f"{api_url}/ui/static/nope.js", timeout=30).status_code == 404
