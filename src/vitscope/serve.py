"""`vitscope serve`: a web page to draw a digit and watch the ViT attend, and the JSON API behind it.

    GET  /              the page: vitscope/web/ (plain HTML, CSS and JS; nothing is fetched from elsewhere)
    GET  /api/health    {"status": "ok"}
    GET  /api/model     the run: name, preset, test accuracy, model config
    POST /api/predict   an image's bytes (an image Content-Type) or multipart/form-data with a file part ->
                        label, probs, the 28x28 input the model saw, the attention rollout map, and the
                        class token's attention in every layer and head
    GET  /openapi.json  the API's schema (the interactive /docs page is off: it loads its code from a CDN)

Uploads are untrusted: a body over 20 MB is refused with 413, counted on the bytes as they arrive (a chunked
upload declares no length); an image that cannot be used (not an image, truncated, a decompression bomb, no
ink) is a 4xx with {"error": "..."}, never a 5xx. Preprocessing is `vitscope predict`'s own, on the server,
so the page shows exactly the 28x28 image the command would save with --save-preprocessed.

Concurrency: the model is loaded once; decoding, preprocessing and the forward pass run in a pool of as many
worker threads as there are cores (at most MAX_WORKERS), torch set to one thread each, so the event loop
stays free while images are worked on and the cores are never oversubscribed.

FastAPI, uvicorn and python-multipart are optional (`pip install 'vitscope[serve]'`), imported only here.
"""

import asyncio
import ipaddress
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .analysis import attention_rollout, has_class_token, rollout_map
from .data import normalize
from .errors import VitscopeError
from .extras import require
from .prediction import BUNDLED_RUN, load_model, model_input, model_input_size
from .preprocess import MAX_FILE_BYTES, ImageRejected
from .rundir import RunDir, config_to_dict

WEB = Path(__file__).parent / "web"
MAX_WORKERS = 4
# The page is self-contained: this makes the browser refuse anything from elsewhere, should a change try.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff",
               "application/octet-stream")


# ---- what the page shows for one image ------------------------------------------------------------------

def run_summary(path: Path, model: torch.nn.Module, bundled: bool) -> dict:
    """What the page's header shows about the run: its name, preset, test accuracy (its last epoch's; none for a
    Hugging Face directory), and model config."""
    run = RunDir(path)
    record = run.read_config()
    metrics = run.read_metrics()
    return {"name": "bundled model" if bundled else path.resolve().name,
            "bundled": bundled,
            "preset": record.get("preset"),
            "test_accuracy": metrics[-1].get("test_acc") if metrics else None,
            "epochs": len(metrics) or None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "model": config_to_dict(model.config)}


@torch.inference_mode()
def explain(model: torch.nn.Module, image: np.ndarray) -> dict:
    """One preprocessed uint8 (S, S) image -> what the model makes of it: the label, all class probabilities,
    the attention rollout over the patch grid, and the attention of the token the classifier reads (the class
    token; the first patch token in the blog model) in every layer and head, over the patches."""
    config = model.config
    grid = config.image_size // config.patch_size
    x = normalize(torch.from_numpy(image)[None], config.pixel_mean, config.pixel_std)  # (1, 1, S, S)
    logits, attentions = model(x, return_attention=True)
    attentions = [a.float() for a in attentions]  # L of (1, H, T, T)
    probs = logits.float().softmax(-1)[0]
    class_token = has_class_token(attentions[0].shape[-1], grid)
    reader = torch.stack([a[0, :, 0, 1:] if class_token else a[0, :, 0, :] for a in attentions])  # (L, H, N)
    return {"label": int(probs.argmax()),
            "probs": probs.tolist(),
            "input": image.tolist(),
            "grid": grid,
            "patch_size": config.patch_size,
            "reader": "class token" if class_token else "first patch token",
            "rollout": _rounded(rollout_map(attention_rollout(attentions), grid)[0]),
            # Raw weights, not renormalised: with a class token, 1 - their sum is what it puts on itself.
            "attention": _rounded(reader.reshape(len(attentions), -1, grid, grid))}


def _rounded(tensor: torch.Tensor, digits: int = 5):
    return np.round(tensor.double().numpy(), digits).tolist()


class Predictor:
    """The model, loaded once, and a bounded pool of worker threads to run it in."""

    def __init__(self, run: str | Path | None = None, workers: int | None = None):
        self.path = Path(run) if run is not None else BUNDLED_RUN
        self.model = load_model(self.path)
        self.size = model_input_size(self.model)  # refuses a colour model now, not at the first request
        self.summary = run_summary(self.path, self.model, bundled=run is None)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.workers = workers or max(1, min(MAX_WORKERS, cores))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vitscope-predict")

    def predict(self, data: bytes) -> dict:
        """An image file's bytes -> `explain`'s answer; ImageRejected for an image that cannot be used."""
        return explain(self.model, model_input(data, self.size))

    async def run(self, data: bytes) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.predict, data)


# ---- the web app ----------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered with 413. A declared Content-Length is
    checked before anything is read; the bytes are counted as they arrive too, since a chunked upload declares
    no length and a client can lie. Nothing over the limit is ever held in memory."""

    def __init__(self, app, max_bytes: int = MAX_FILE_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> dict:
        return {"error": f"request body is over the {self.max_bytes // 2**20} MB limit"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self._refusal())
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def noting_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, self._refusal())


class SecurityHeaders:
    """ASGI middleware: every response tells the browser to load nothing from elsewhere and not to guess types."""

    HEADERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def create_app(run: str | Path | None = None, workers: int | None = None):
    """The FastAPI app serving `run` (a run directory or Hugging Face directory; None: the bundled model)."""
    fastapi, _, _ = require("serve", "serving", "fastapi", "uvicorn", "python_multipart")
    from fastapi import Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    # One thread per worker: a 28x28 forward pass gains nothing from more, and the workers share the cores.
    torch.set_num_threads(1)
    predictor = Predictor(run, workers)

    class Error(BaseModel):
        error: str

    class Explanation(BaseModel):
        label: int
        probs: list[float]
        input: list[list[int]]
        grid: int
        patch_size: int
        reader: str
        rollout: list[list[float]]
        attention: list[list[list[list[float]]]]

    class Health(BaseModel):
        status: str

    errors = {status: {"model": Error, "description": text} for status, text in [
        (400, "a malformed request (a multipart body without a file part, bad multipart data)"),
        (413, "a body over 20 MB"),
        (415, "neither an image Content-Type nor multipart/form-data"),
        (422, "an image that cannot be used: not an image, truncated, over 8192 px a side or 40 megapixels, "
              "or no ink"),
    ]}
    binary = {"schema": {"type": "string", "format": "binary"}}
    request_body = {"required": True, "content": {
        **{media_type: binary for media_type in MEDIA_TYPES},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}}}}

    app = fastapi.FastAPI(title="vitscope", version=__version__, docs_url=None, redoc_url=None,
                          description="Draw a digit and watch the ViT attend.")
    app.state.predictor = predictor

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"error": "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request"},
                            status_code=422)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/api/health", response_model=Health)
    def health():
        return {"status": "ok"}

    @app.get("/api/model")
    def model_info() -> dict:
        """The run served: name, preset, test accuracy (its last epoch's), parameters and model config."""
        return predictor.summary

    @app.post("/api/predict", response_model=Explanation, responses=errors,
              openapi_extra={"requestBody": request_body})
    async def predict(request: Request):
        """Classify one digit image and show where the model looked. The body is the image file's bytes with
        its Content-Type (or application/octet-stream), or multipart/form-data whose first file part is the
        image. Preprocessed as `vitscope predict` does."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            async with request.form(max_files=1, max_fields=16) as form:
                uploads = [value for value in form.values() if isinstance(value, UploadFile)]
                if not uploads:
                    raise HTTPException(400, "the multipart body has no file part (a part with a filename)")
                data = await uploads[0].read()
        elif media_type.startswith("image/") or media_type == "application/octet-stream":
            data = await request.body()
        else:
            raise HTTPException(415, "send the image file's bytes with an image Content-Type (image/png, image/jpeg, "
                                     f"...) or as multipart/form-data, not {media_type or 'no Content-Type'}")
        try:
            return await predictor.run(data)
        except ImageRejected as e:
            return JSONResponse({"error": str(e)}, status_code=422)

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)
    return app


# ---- the command ----------------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6; port 0 picks a free one), or a one-line VitscopeError."""
    if not 0 <= port <= 65535:
        raise VitscopeError(f"--port must be 0..65535, not {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except socket.gaierror as e:
        raise VitscopeError(f"cannot serve on {host}: {e.strerror}") from None
    except OSError as e:
        raise VitscopeError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(run: str | Path | None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the page and API until Ctrl+C; prints the address it serves on (the real port, for --port 0)."""
    uvicorn = require("serve", "serving", "uvicorn")[0]
    app = create_app(run)
    sock = bind(host, port)
    summary = app.state.predictor.summary
    print(f"vitscope serve: {summary['name']} ({summary['preset'] or 'no'} preset) at {url_of(sock)}  "
          "(Ctrl+C stops)", flush=True)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        print(f"vitscope serve: note: {host} is reachable from other machines, not only this one", flush=True)
    # Malformed uploads are answered with a 4xx; the multipart parser's own warning about each is noise here.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
