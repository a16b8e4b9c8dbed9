"""`vitscope serve`: the API and its limits, a schema-driven fuzz run, and the page in a real headless Chromium
(Debian's /usr/bin/chromium, driven by Playwright). Screenshots go to build/test-artifacts/serve/ (or
$VITSCOPE_TEST_ARTIFACTS)."""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from conftest import run_cli
from test_prediction import drawn
from test_preprocess import digit_like, encoded, png_claiming
from vitscope import BlogViT, RunDir, ViTConfig
from vitscope.data import normalize
from vitscope.prediction import load_model
from vitscope.serve import BodyLimit, create_app

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("VITSCOPE_TEST_ARTIFACTS", Path(__file__).parents[1] / "build" / "test-artifacts"))


def png(image: Image.Image) -> bytes:
    return encoded(image, "PNG")


def multipart(data: bytes, name="digit.png", field="file", content_type="image/png") -> dict:
    return {"files": {field: (name, data, content_type)}}


@pytest.fixture(scope="module")
def app():
    return create_app(None)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def server():
    """`vitscope serve --port 0` in its own process, as a user starts it: yields the URL it says it serves."""
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, "-m", "vitscope", "serve", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(60, process.kill)  # a server that never says where it serves fails, not hangs
    watchdog.start()
    line = process.stdout.readline()
    watchdog.cancel()
    try:
        if "http://127.0.0.1:" not in line:
            process.kill()
            log.seek(0)
            pytest.fail(f"vitscope serve did not start: {line!r} {log.read()!r}")
        yield line.split(" at ")[1].split()[0]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        process.stdout.close()
        log.seek(0)
        assert "Traceback" not in log.read()  # nothing the server hit went unhandled
        log.close()


# ---- the API ----------------------------------------------------------------------------------------------

def test_health_and_model(client):
    assert client.get("/api/health").json() == {"status": "ok"}
    page = client.get("/")
    assert "<canvas" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    run = client.get("/api/model").json()
    assert run["name"] == "bundled model" and run["preset"] == "fast"
    assert run["test_accuracy"] == pytest.approx(0.9908, abs=1e-4)
    assert run["model"]["depth"] == 4 and run["model"]["patch_size"] == 7


def test_predict_answers_with_label_probs_input_and_attention(client):
    answer = client.post("/api/predict", content=png(drawn(1)), headers={"content-type": "image/png"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["label"] == 1 and int(np.argmax(result["probs"])) == 1
    assert len(result["probs"]) == 10 and sum(result["probs"]) == pytest.approx(1, abs=1e-5)
    assert np.asarray(result["input"]).shape == (28, 28) and np.asarray(result["input"]).max() == 255
    assert result["grid"] == 4 and result["patch_size"] == 7 and result["reader"] == "class token"
    assert np.asarray(result["rollout"]).shape == (4, 4) and np.sum(result["rollout"]) == pytest.approx(1, abs=1e-3)
    attention = np.asarray(result["attention"])  # (layers, heads, grid, grid)
    assert attention.shape == (4, 4, 4, 4) and attention.min() >= 0 and attention.sum(axis=(2, 3)).max() <= 1 + 1e-4


def test_multipart_and_raw_bytes_give_the_same_answer(client):
    data = encoded(drawn(7), "JPEG", quality=85)
    raw = client.post("/api/predict", content=data, headers={"content-type": "image/jpeg"}).json()
    form = client.post("/api/predict", **multipart(data, "seven.jpg", content_type="image/jpeg")).json()
    octets = client.post("/api/predict", content=data, headers={"content-type": "application/octet-stream"}).json()
    assert raw["label"] == 7 and raw == form == octets


def test_probs_are_vitscope_predicts(client):
    import vitscope
    data = png(digit_like(size=(200, 160)))
    served = client.post("/api/predict", content=data, headers={"content-type": "image/png"}).json()
    (expected,) = vitscope.predict(None, [data])
    assert served["label"] == expected.label
    assert served["probs"] == pytest.approx(expected.probs, abs=1e-5)


def test_rollout_and_attention_are_the_models_own(client):
    """Recomputed here from the model's attention with numpy: heads averaged, identity added, rows
    renormalised, multiplied through the layers; the class token's row over the patches."""
    result = client.post("/api/predict", content=png(drawn(0)), headers={"content-type": "image/png"}).json()
    model = load_model(None)
    x = normalize(torch.tensor(result["input"], dtype=torch.uint8)[None], 0.1307, 0.3081)
    with torch.no_grad():
        _, attentions = model(x, return_attention=True)
    layers = [a[0].double().numpy() for a in attentions]  # (H, 17, 17) each
    rollout = np.eye(17)
    for a in layers:
        mixed = a.mean(0) + np.eye(17)
        rollout = (mixed / mixed.sum(1, keepdims=True)) @ rollout
    expected = rollout[0, 1:] / rollout[0, 1:].sum()
    assert np.asarray(result["rollout"]).ravel() == pytest.approx(expected, abs=1e-4)
    assert np.asarray(result["attention"]).reshape(4, 4, 16) == pytest.approx(
        np.stack([a[:, 0, 1:] for a in layers]), abs=1e-4)


def test_the_preview_is_what_vitscope_predict_saves(client, tmp_path):
    image = tmp_path / "photo.jpg"
    digit_like(size=(300, 220), ink=(40, 40, 120), paper=(235, 230, 210), mode="RGB").save(image, quality=90)
    p = run_cli("predict", image, "--save-preprocessed", tmp_path / "seen")
    assert p.returncode == 0, p.stderr
    saved = np.asarray(Image.open(tmp_path / "seen" / "photo.png"))
    served = client.post("/api/predict", content=image.read_bytes(), headers={"content-type": "image/jpeg"}).json()
    assert np.array_equal(np.asarray(served["input"], np.uint8), saved)


def test_a_run_directory_is_served_and_the_blog_models_reader_is_its_first_patch(tmp_path):
    config = ViTConfig(architecture="blog", patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32)
    run = RunDir(tmp_path / "blog-run")
    run.write_config({"preset": "blog", "model": asdict(config)})
    run.save_weights(BlogViT(config))
    run.write_metrics([{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.625}])
    with TestClient(create_app(run.path)) as blog:
        info = blog.get("/api/model").json()
        assert (info["name"], info["preset"], info["test_accuracy"], info["bundled"]) == ("blog-run", "blog", 0.625,
                                                                                          False)
        result = blog.post("/api/predict", **multipart(png(drawn(0)))).json()
    assert result["reader"] == "first patch token" and len(result["probs"]) == 10
    assert np.asarray(result["attention"]).shape == (2, 2, 4, 4)  # no class token: all 16 patches, summing to 1
    assert np.asarray(result["attention"]).sum(axis=(2, 3)) == pytest.approx(np.ones((2, 2)), abs=1e-4)
    assert np.sum(result["rollout"]) == pytest.approx(1, abs=1e-3)


def bad_requests() -> list:
    """(name, request keyword arguments, status, words in the error): the predict tests' bad files and more."""
    as_png = lambda data: {"content": data, "headers": {"content-type": "image/png"}}  # noqa: E731
    return [
        ("not an image", as_png(b"these are not the pixels you are looking for"), 422, "not an image"),
        ("empty body", as_png(b""), 422, "empty"),
        ("truncated PNG", as_png(png(digit_like())[:300]), 422, "truncated"),
        ("truncated JPEG", as_png(encoded(digit_like(mode="RGB"), "JPEG")[:400]), 422, "truncated"),
        ("bomb 100000x100000", as_png(png_claiming(100_000, 100_000)), 422, "over the limit"),
        ("bomb 7000x7000", as_png(png_claiming(7000, 7000)), 422, "40 megapixels"),
        ("9000 px wide", as_png(png(Image.new("L", (9000, 2), 255))), 422, "8192 px"),
        ("blank page", as_png(png(Image.new("RGB", (80, 80), "white"))), 422, "no ink"),
        ("PPM, not taken", as_png(encoded(digit_like(), "PPM")), 422, "not a supported format"),
        ("text Content-Type", {"content": png(drawn(1)), "headers": {"content-type": "text/plain"}}, 415, "image"),
        ("no Content-Type", {"content": png(drawn(1))}, 415, "Content-Type"),
        ("multipart, bomb inside", multipart(png_claiming(100_000, 100_000)), 422, "over the limit"),
        ("multipart, no file part", {"content": b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
                                                b"a string, not a file\r\n--b--\r\n",
                                     "headers": {"content-type": "multipart/form-data; boundary=b"}},
         400, "no file part"),
        ("multipart, no boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
         400, "boundary"),
        ("multipart, garbage", {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=b"}},
         400, "multipart"),
        ("over 20 MB, declared", as_png(b"\0" * (20 * 2**20 + 1)), 413, "20 MB"),
        ("over 20 MB, chunked", {"content": iter([b"\0" * 2**20] * 21), "headers": {"content-type": "image/png"}},
         413, "20 MB"),
    ]


def test_bad_inputs_are_4xx_with_a_json_error_and_the_server_answers_after(server):
    with httpx.Client(base_url=server, timeout=30) as http:
        for name, request, status, words in bad_requests():
            answer = http.post("/api/predict", **request)
            assert answer.status_code == status, (name, answer.text)
            assert answer.headers["content-type"].startswith("application/json"), name
            assert words in answer.json()["error"], (name, answer.json())
        assert http.get("/api/predict").status_code == 405
        assert "error" in http.get("/no/such/page").json()
        assert http.get("/api/health").json() == {"status": "ok"}
        answer = http.post("/api/predict", content=png(drawn(1)), headers={"content-type": "image/png"})
        assert answer.json()["label"] == 1


def test_chunked_upload_over_20_mb_is_refused_on_the_bytes_received(server):
    """A raw chunked upload with no Content-Length: the server counts what arrives and answers 413."""
    host, port = urlsplit(server).hostname, urlsplit(server).port
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"\0" * 2**20
        try:
            for _ in range(40):  # 40 MB offered; the server stops reading past 20
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = connection.recv(65536)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"20 MB limit" in reply


def test_body_limit_counts_the_bytes_that_arrive():
    """BodyLimit alone, at 100 bytes: exactly the limit passes, one more is 413 with or without a length."""
    async def echo(request):
        return PlainTextResponse(str(len(await request.body())))

    app = Starlette(routes=[Route("/", echo, methods=["POST"])], middleware=[Middleware(BodyLimit, max_bytes=100)])
    with TestClient(app) as limited:
        assert limited.post("/", content=b"x" * 100).text == "100"
        assert limited.post("/", content=b"x" * 101).status_code == 413
        chunked = limited.post("/", content=iter([b"x" * 60, b"x" * 41]))
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
        assert limited.post("/", content=iter([b"x" * 60, b"x" * 40])).text == "100"


def test_slow_predictions_run_in_a_bounded_pool_and_do_not_block_the_server(app, client, monkeypatch):
    predictor = app.state.predictor
    assert predictor.workers <= os.cpu_count() and torch.get_num_threads() == 1
    real_predict, running, most = predictor.predict, [0], [0]
    lock = threading.Lock()

    def slow_predict(data):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        try:
            return real_predict(data)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(predictor, "predict", slow_predict)
    data = png(drawn(1))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        client.post("/api/predict", content=data, headers={"content-type": "image/png"}).status_code))
        for _ in range(3 * predictor.workers)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert client.get("/api/health").status_code == 200
    assert time.perf_counter() - started < 0.25  # answered while the pool is busy
    for thread in threads:
        thread.join()
    assert answers == [200] * len(threads) and most[0] == predictor.workers


# ---- schema-driven fuzzing --------------------------------------------------------------------------------

@st.composite
def image_files(draw, image_format: str):
    """Bytes a client might send as an image: a real small image in `image_format` (ink or none), that image
    cut short or with bytes flipped, or arbitrary bytes."""
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    image = Image.new("RGB", size, draw(st.sampled_from(["white", "black", "gray"])))
    ImageDraw.Draw(image).line([(0, 0), size], fill=draw(st.sampled_from(["black", "white", "red"])), width=3)
    data = encoded(image, image_format)
    how = draw(st.sampled_from(["whole", "cut", "flipped", "random"]))
    if how == "cut":
        return data[:draw(st.integers(0, len(data)))]
    if how == "flipped":
        buffer = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            buffer[at] ^= 0xFF
        return bytes(buffer)
    if how == "random":
        return draw(st.binary(max_size=2048))
    return data


for media_type, image_format in [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/gif", "GIF"),
                                 ("image/webp", "WEBP"), ("image/bmp", "BMP"), ("image/tiff", "TIFF"),
                                 ("application/octet-stream", "PNG")]:
    schemathesis.openapi.media_type(media_type, image_files(image_format))


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow's notes on the corrupt TIFFs sent
def test_fuzzing_the_api_schema_finds_no_server_error(app):
    """schemathesis generates requests from /openapi.json for every operation and runs all its checks on the
    answers (no 5xx, documented status codes and content types, responses matching their schema), except
    "schema-valid data is accepted": no schema can say "an image with a digit in it", so a valid-looking body is
    rightly refused (422, no ink). (Its pytest plugin's lazy fixtures do not run on pytest 9: the loop is ours.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {"POST /api/predict", "GET /api/model"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()


# ---- the command ------------------------------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path):
    p = run_cli("serve", tmp_path / "no-run", timeout=60)
    assert p.returncode == 2 and "no run directory" in p.stderr and p.stderr.strip().count("\n") == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p = run_cli("serve", "--port", taken.getsockname()[1], timeout=60)
    assert p.returncode == 2 and "cannot serve on 127.0.0.1" in p.stderr and p.stderr.strip().count("\n") == 0


# ---- the page, in a real browser --------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's chromium is not installed at {CHROMIUM} "
                                    "(`make setup` installs it where apt-get runs as root)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


class PageWatch:
    """A page, with every request it made and every script error it hit. The page's Content-Security-Policy is
    bypassed: Playwright's waits evaluate strings, which it forbids, and a request the policy would have blocked
    silently is one the log below must see."""

    def __init__(self, browser, **context_options):
        self.context = browser.new_context(bypass_csp=True, **context_options)
        self.page = self.context.new_page()
        self.requests, self.errors = [], []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))

    def outside_requests(self) -> list[str]:
        return [url for url in self.requests if urlsplit(url).scheme not in ("data", "blob")
                and urlsplit(url).hostname != "127.0.0.1"]

    def wait_for_label(self, label: str) -> str:
        """Waits for the last answer (none still due or on its way) to be `label`; returns its probability."""
        self.page.wait_for_function(f"document.body.dataset.state === 'predicted' && "
                                    f"document.getElementById('answer').getAttribute('aria-busy') === 'false' && "
                                    f"document.getElementById('label').textContent === '{label}'", timeout=15_000)
        return self.page.text_content("#confidence")

    def canvas_pixels(self, canvas_id: str) -> np.ndarray:
        """(H, W, 4) RGBA of a canvas's backing store."""
        width, height, data = self.page.evaluate(f"""() => {{
            const canvas = document.getElementById('{canvas_id}');
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            return [canvas.width, canvas.height, Array.from(pixels)];
        }}""")
        return np.asarray(data, np.uint8).reshape(height, width, 4)

    def close(self):
        self.context.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.joinpath("serve").mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve" / name), full_page=True)


def draw_with_mouse(page, *points) -> None:
    """One stroke through `points`, given as fractions of the pad's width and height."""
    box = page.locator("#pad").bounding_box()
    at = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for point in at[1:]:
        page.mouse.move(*point, steps=10)
    page.mouse.up()


@pytest.mark.browser
@needs_chromium
def test_page_on_a_desktop_draw_clear_open_and_drop_files(browser, server, tmp_path):
    watch = PageWatch(browser, viewport={"width": 1280, "height": 860})
    page = watch.page
    page.goto(server)
    page.wait_for_function("document.getElementById('run').textContent.includes('fast preset')")
    assert "99.08%" in page.text_content("#run")
    assert page.is_visible("#hint") and page.is_visible("#empty") and not page.is_visible("#prediction")

    # A vertical stroke with the mouse: a "1", its probability, and the attention maps.
    draw_with_mouse(page, (0.5, 0.15), (0.5, 0.85))
    confidence = watch.wait_for_label("1")
    assert confidence.endswith("%") and float(confidence[:-1]) > 50
    assert page.locator("#bars li").count() == 3 and page.text_content("#bars li .digit") == "1"
    rollout = watch.canvas_pixels("rollout")[..., :3].astype(int)
    assert rollout.std() > 10  # a map, not a blank
    assert page.is_hidden("#hint")
    before = watch.canvas_pixels("attention")
    page.select_option("#layer", index=0)
    page.select_option("#head", index=2)  # head 2
    assert "on the patches" in page.text_content("#attention-note")
    assert not np.array_equal(before, watch.canvas_pixels("attention"))  # another layer's and head's map
    screenshot(page, "serve-desktop-one.png")

    # Clear with the keyboard: focus the button, press Enter.
    page.focus("#clear")
    page.keyboard.press("Enter")
    page.wait_for_function("document.body.dataset.state === 'empty'")
    assert page.is_visible("#hint") and page.is_visible("#empty") and not page.is_visible("#prediction")
    assert (watch.canvas_pixels("pad")[..., :3] == 255).all()

    # A digit file through the file picker: its label, and the preview is `vitscope predict --save-preprocessed`.
    image = tmp_path / "seven.png"
    drawn(7).save(image)
    page.set_input_files("#file", str(image))
    watch.wait_for_label("7")
    assert "seven.png" in page.text_content("#source")
    p = run_cli("predict", image, "--save-preprocessed", tmp_path / "seen")
    assert p.returncode == 0, p.stderr
    saved = np.asarray(Image.open(tmp_path / "seen" / "seven.png"))
    preview = watch.canvas_pixels("input")
    assert preview.shape == (28, 28, 4) and np.array_equal(preview[..., 0], saved)

    # A file dropped on the drawing area.
    page.evaluate("""([name, bytes]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
        document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer,
                                                                                  bubbles: true, cancelable: true}));
    }""", ["zero.png", list(png(drawn(0)))])
    watch.wait_for_label("0")
    assert "zero.png" in page.text_content("#source")

    # A file that is not an image: the server's reason, shown.
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.body.dataset.state === 'error'")
    assert "not an image" in page.text_content("#error")

    # A 7 in one stroke with a corner, for the README's picture: the last layer's heads averaged, as at the start.
    page.click("#clear")
    page.select_option("#layer", index=3)  # the last
    page.select_option("#head", index=0)  # mean
    draw_with_mouse(page, (0.25, 0.2), (0.75, 0.2), (0.45, 0.85))
    watch.wait_for_label("7")
    page.evaluate("document.activeElement.blur()")
    screenshot(page, "serve-desktop.png")

    assert watch.outside_requests() == [] and any("/api/predict" in url for url in watch.requests)
    assert all("422" in error for error in watch.errors), watch.errors  # the refused file's, logged by Chromium
    watch.close()


@pytest.mark.browser
@needs_chromium
def test_page_on_a_phone_draws_with_touch_and_does_not_scroll(browser, server):
    watch = PageWatch(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                      has_touch=True)
    page = watch.page
    page.goto(server)
    page.wait_for_function("document.getElementById('run').textContent.includes('preset')")
    assert page.evaluate("document.scrollingElement.scrollHeight > window.innerHeight")  # it could scroll
    assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")  # nothing wider than a phone
    box = page.locator("#pad").bounding_box()
    x = box["x"] + box["width"] * 0.5
    bottom, top = box["y"] + box["height"] * 0.85, box["y"] + box["height"] * 0.15

    # A finger dragged upwards over the pad, as CDP touch events: on a scrolling page this would scroll down.
    cdp = page.context.new_cdp_session(page)
    touch = lambda kind, points: cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})  # noqa: E731
    # Fast, lifted at full speed: read as a swipe, Chromium would start a fling and take the next tap (on Clear,
    # below) as the one that stops it instead of a click.
    touch("touchStart", [{"x": x, "y": bottom, "id": 1}])
    for step in range(1, 13):
        touch("touchMove", [{"x": x, "y": bottom + (top - bottom) * step / 12, "id": 1}])
    touch("touchEnd", [])
    confidence = watch.wait_for_label("1")
    assert float(confidence[:-1]) > 50
    assert page.evaluate("window.scrollY") == 0
    screenshot(page, "serve-phone.png")

    page.tap("#clear")
    page.wait_for_function("document.body.dataset.state === 'empty'")
    assert watch.outside_requests() == [] and watch.errors == []
    watch.close()
