"""The HTTP service of an exported model: FastAPI routes over the dynamic batcher.

``POST /v1/features`` and ``POST /v1/attention`` take one or more images as multipart form fields
named ``image``; ``GET /health``, ``GET /metrics`` (Prometheus text) and ``GET /`` (a page to
look at the maps) complete it. A bad request is a 4xx with ``{"error": "<one line>"}`` naming its
cause, and never stops the server; :class:`RequestGuard` checks the API key and the body first.
Uploads are decoded in worker threads and the model runs in the batcher's thread, so the event
loop only moves bytes.
"""
import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from dino_fast.serving.batcher import BatcherStopped, DynamicBatcher
from dino_fast.serving.guard import BodyTimeout, BodyTooLarge, RequestGuard
from dino_fast.serving.images import RequestError, prepare_upload
from dino_fast.serving.maps import FORMATS, attention_body, features_body
from dino_fast.serving.metrics import Metrics

# Requests decoding at once: each holds up to --max_pixels decoded RGB pixels, so this bounds
# that memory (4 x 3 bytes x 25M pixels = 300 MB at the default); more would not run faster on
# a machine whose cores the model runs also use.
DECODE_WORKERS = 4


@dataclass
class ServeSettings:
    """What the service allows and how it batches: the ``serve`` flags, which give the
    defaults (``python -m dino_fast.serve --help``)."""

    image_size: tuple  # as infer's --image_size: (shorter side,) or (H, W)
    input_pixels: int  # the most pixels of one model input (the model's pixel budget)
    max_batch: int
    max_wait_ms: float
    max_images: int  # per request
    max_pixels: int  # of one uploaded image, before resizing
    max_body_bytes: int
    body_timeout_s: float
    threshold: float  # of /v1/attention's masks, when the request gives none
    api_key: str | None = None


def create_app(predictor, settings: ServeSettings):
    """The ASGI application serving ``predictor`` (an :class:`AttentionMapPredictor`)."""
    metrics = Metrics()
    decoding = asyncio.Semaphore(DECODE_WORKERS)
    batcher = DynamicBatcher(predictor.run, settings.max_batch, settings.max_wait_ms,
                             metrics.observe_batch)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()  # after uvicorn has let the in-flight requests finish

    app = FastAPI(title="dino_fast", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_parameter)
    app.add_exception_handler(Exception, _server_error)  # uvicorn logs the traceback
    page = resources.files("dino_fast.serving").joinpath("page.html").read_text()
    model = {"arch": predictor.arch, "patch_size": predictor.patch_size,
             "num_heads": predictor.num_heads, "precision": predictor.precision,
             "runtime": predictor.describe()}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model, "images_in_flight": batcher.in_flight}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(batcher.in_flight),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/features")
    async def features(request: Request):
        images, results = await _run(request, settings, predictor, batcher, decoding)
        return features_body(images, results)

    @app.post("/v1/attention")
    async def attention(request: Request, threshold: float | None = None, format: str = "json"):
        threshold = settings.threshold if threshold is None else threshold
        if not 0 < threshold <= 1:
            raise RequestError(422, f"threshold must be in (0, 1], got {threshold}")
        if format not in FORMATS:
            raise RequestError(422, f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        images, results = await _run(request, settings, predictor, batcher, decoding)
        return await run_in_threadpool(attention_body, images, results, predictor.patch_size,
                                       threshold, format)

    return RequestGuard(app, metrics, settings.max_body_bytes, settings.body_timeout_s,
                        settings.api_key)


async def _run(request: Request, settings: ServeSettings, predictor, batcher, decoding):
    """The request's images, prepared, and the model's ``(attentions, features)`` of each."""
    uploads = await _read_uploads(request, settings)
    async with decoding:
        images = await run_in_threadpool(_prepare_all, uploads, settings, predictor.patch_size)
    try:
        results = await batcher.submit([image.pixels for image in images])
    except BatcherStopped:
        raise RequestError(503, "the server is shutting down; retry elsewhere") from None
    return images, results


async def _read_uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each ``image`` field; a body that is not what the API takes is a
    :class:`RequestError` naming why."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError(415, f"send the images as multipart/form-data fields named image, "
                           f"not {content_type or 'a body without a Content-Type'}")
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images,
                                  max_part_size=64 * 1024)
    except BodyTooLarge as err:
        raise RequestError(413, str(err)) from None
    except BodyTimeout as err:
        raise RequestError(408, str(err)) from None
    except (MultiPartException, HTTPException) as err:  # Starlette turns the first into 400s
        message = str(getattr(err, "detail", None) or getattr(err, "message", err))
        if "Too many files" in message:
            raise RequestError(413, f"too many images: at most {settings.max_images} in one "
                               "request (--max_images)") from None
        raise RequestError(400, f"malformed multipart body: {message}") from None
    fields = form.getlist("image")
    if not fields:
        raise RequestError(400, "no image: send one or more files as multipart fields named "
                           f"image (got fields: {', '.join(sorted(form.keys())) or 'none'})")
    if not all(isinstance(field, UploadFile) for field in fields):
        raise RequestError(400, "the image fields must be files (multipart with a filename)")
    uploads = [(field.filename or f"image {i + 1}", await field.read())
               for i, field in enumerate(fields)]
    await form.close()
    return uploads


def _prepare_all(uploads, settings: ServeSettings, patch_size: int):
    return [prepare_upload(data, name, settings.max_pixels, settings.image_size, patch_size,
                           settings.input_pixels) for name, data in uploads]


async def _request_error(request: Request, err: RequestError):
    return JSONResponse({"error": err.message}, status_code=err.status)


async def _http_error(request: Request, err: HTTPException):
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code,
                        headers=getattr(err, "headers", None))


async def _invalid_parameter(request: Request, err: RequestValidationError):
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": f"invalid parameter: {problems}"}, status_code=422)


async def _server_error(request: Request, err: Exception):
    message = " ".join(str(err).split()) or "no message"
    return JSONResponse({"error": f"server error: {type(err).__name__}: {message}"},
                        status_code=500)
