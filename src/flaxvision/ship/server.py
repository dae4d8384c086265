"""`flaxvision serve`: an HTTP API over a model (FastAPI app, run by uvicorn), with dynamic batching.

Routes:
  POST /predict   one image as the raw body (Content-Type image/* or application/octet-stream), or one or several
                  images as multipart/form-data file parts (any field names); `?top_k=N`. Answers what
                  `flaxvision predict --json` prints: [{"path", "predictions": [{"label", "probability"}]}], in the
                  order of the parts; "path" is the part's filename ("image-N" for an empty filename, N its position
                  from 1), "image" for a raw body; a part without a filename is a form field, refused (422). All or nothing: when one image of a request cannot be used, the whole
                  request is answered with that image's 4xx, and no image of it is predicted.
  GET /health     {"status": "ok", counters}; GET /metadata: program.metadata(...) and the server's settings.

Every error is JSON {"error": "<one line>"}: 400 empty body, 413 body over --max-request-mb (checked on
Content-Length and while reading: the body is never buffered past the limit), an image over --max-image-pixels
or more than --max-images parts, 415 a content type other than the above, 422 data that is not a readable image
or a bad query, 404/405 unknown routes; a server error is logged once and answered 500, and the server goes on.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request) at runtime.

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from flaxvision.ship.batcher import Batcher, BatchFailed

log = logging.getLogger("flaxvision.serve")
ROUTES = "POST /predict, GET /health, GET /metadata"
RAW_TYPES = ("application/octet-stream",)  # and every image/* type


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What `flaxvision serve` was asked for (validated by the command before the model is loaded)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    top_k: int = 5
    max_request_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    max_images: int = 64
    decode_threads: int = 4

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)


class BadRequest(Exception):
    """An answer other than 200: its status and one line for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Service:
    """The model behind the routes: decoding in a thread pool, the batcher, the counters of GET /health."""

    def __init__(self, model: Any, settings: ServeSettings, source: str):
        self.model, self.settings, self.source = model, settings, source
        self.names = model.class_names()
        self.batcher = Batcher(model, settings.max_batch, settings.max_wait_ms / 1000.0)
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="flaxvision-decode")
        self.requests = self.errors = self.in_flight = 0
        self.coming = 0  # requests in flight whose images are not queued yet (read by the batcher's worker)
        self.batcher.more_coming = lambda: self.coming > 0

    def health(self) -> dict[str, Any]:
        b = self.batcher
        return {"status": "ok", "requests": self.requests, "in_flight": self.in_flight, "errors": self.errors,
                "images": b.images, "batches": b.batches, "max_batch_seen": b.max_batch_seen,
                "compiled_shapes": b.traces, "buckets": list(b.buckets)}  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        from flaxvision.ship.program import metadata

        s = self.settings
        server = {"buckets": list(self.batcher.buckets), "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms,
                  "top_k": s.top_k, "max_request_bytes": s.max_request_bytes, "max_image_pixels": s.max_image_pixels,
                  "max_images": s.max_images, "routes": ROUTES.split(", ")}  # fmt: skip
        return {**metadata(self.model, self.batcher.spec, format="serve", source=self.source), "server": server}

    def decode(self, name: str, data: bytes) -> np.ndarray:
        """One image for the model, or the request's 4xx naming it."""
        from flaxvision.data.transforms import BadImage, decode_eval

        if not data:
            raise BadRequest(400, f"{name}: empty (zero bytes); send the image's bytes")
        try:
            return decode_eval(data, self.model.preprocessing, max_image_pixels=self.settings.max_image_pixels)
        except BadImage as err:
            # open_image's two size refusals (our pixel limit, Pillow's bomb check) are 413; the rest is bad data.
            status = 413 if str(err).startswith(("too large", "decompression bomb")) else 422
            hint = "; resize it or raise --max-image-pixels" if status == 413 else "; send a JPEG, PNG, WebP, ..."
            message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # PIL names our buffer
            raise BadRequest(status, f"{name}: {message}{hint}") from None

    async def predict(self, request: Any) -> list[dict[str, Any]]:
        self.coming += 1
        try:
            top_k = self._top_k(request.query_params)
            parts = await self._parts(request)
            loop = asyncio.get_running_loop()
            images = await asyncio.gather(*[loop.run_in_executor(self.pool, self.decode, name, data)
                                            for name, data in parts])  # fmt: skip
            futures = [self.batcher.submit(image) for image in images]
        finally:
            self.coming -= 1
        probs = await asyncio.gather(*futures)
        k = min(top_k, len(self.names))
        out = []
        for (name, _), p in zip(parts, probs):
            top = np.argsort(-p)[:k]  # as predict orders them
            out.append({"path": name, "predictions": [{"label": self.names[i], "probability": float(p[i])}
                                                      for i in top]})  # fmt: skip
        return out

    def _top_k(self, query: Any) -> int:
        unknown = sorted(set(query.keys()) - {"top_k"})
        if unknown:
            raise BadRequest(422, f"unknown query parameter {unknown[0]!r}; /predict takes only top_k")
        raw = query.get("top_k")
        if raw is None:
            return self.settings.top_k
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise BadRequest(422, f"top_k must be an integer >= 1, got {raw!r}")
        return value

    async def _parts(self, request: Any) -> list[tuple[str, bytes]]:
        """(name, encoded bytes) of each image of the request, its size checked while it is read."""
        limit = self.settings.max_request_bytes
        mb = f"{self.settings.max_request_mb:g} MB"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadRequest(413, f"request body of {int(length)} bytes is over the {mb} limit (--max-request-mb)")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()

        async def body() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise BadRequest(413, f"request body is over the {mb} limit (--max-request-mb)")
                yield chunk

        if media.startswith("image/") or media in RAW_TYPES:
            data = b"".join([chunk async for chunk in body()])
            if not data:
                raise BadRequest(400, "empty request body; send an image (or multipart/form-data files)")
            return [("image", data)]
        if media != "multipart/form-data":
            raise BadRequest(415, f"content type {media or '(none)'!r} is not accepted; send multipart/form-data "
                                  "files, or one image as the body with an image/* or application/octet-stream type")
        return await self._multipart(request, body())

    async def _multipart(self, request: Any, stream: AsyncIterator[bytes]) -> list[tuple[str, bytes]]:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        most = self.settings.max_images
        parser = MultiPartParser(request.headers, stream, max_files=most, max_fields=most)  # type: ignore[arg-type]
        try:
            form = await parser.parse()
        except MultiPartException as err:
            if str(err).startswith(("Too many files", "Too many fields")):
                raise BadRequest(413, f"more than {most} parts in one request (--max-images); split it") from None
            raise BadRequest(400, f"malformed multipart/form-data: {err}") from None
        try:
            parts = []
            for index, (field, value) in enumerate(form.multi_items(), start=1):
                if not isinstance(value, UploadFile):
                    raise BadRequest(422, f"multipart field {field!r} is not a file; send each image as a file part "
                                          "(curl -F 'image=@cat.jpg')")  # fmt: skip
                parts.append((value.filename or f"image-{index}", await value.read()))
        finally:
            await form.close()
        if not parts:
            raise BadRequest(400, "multipart/form-data request without any file; send one or more images")
        return parts


def create_app(service: Service) -> Any:
    """The FastAPI app over `service`; the lifespan runs its device worker (started and stopped with the app)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:  # after uvicorn has let the in-flight requests finish
            service.batcher.stop()
            service.pool.shutdown(wait=True)

    app = FastAPI(title="flaxvision serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        service.errors += 1
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path}; the routes are {ROUTES}")
        if exc.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}; the routes are {ROUTES}")
        return error(exc.status_code, str(exc.detail).splitlines()[0] if exc.detail else "bad request")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return error(422, f"bad request: {first.get('msg', 'invalid')} at {'.'.join(map(str, first.get('loc', ())))}")

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        service.requests += 1
        service.in_flight += 1
        try:
            return JSONResponse(await service.predict(request))
        except BadRequest as err:
            return error(err.status, err.message)
        except BatchFailed as err:  # logged by the batcher
            return error(500, f"internal server error ({err}); see the server's log")
        except Exception as err:  # logged once here, answered 500; the server keeps serving
            log.exception("flaxvision serve: POST /predict failed")
            return error(500, f"internal server error ({type(err).__name__}); see the server's log")
        finally:
            service.in_flight -= 1

    @app.get("/health")
    async def health() -> Any:
        return service.health()

    @app.get("/metadata")
    async def metadata() -> Any:
        return service.metadata()

    return app
