"""The scoring service as a FastAPI app: ``create_app(weights, ...)``; ``serve.py`` runs it on uvicorn.

Routes:

- ``GET /health``: 200 ``{"status": "ok", "model", "fingerprint", "experts", "threshold", ...}`` once the model
  is loaded; 503 with ``"status": "loading"`` (or ``"error"`` and the reason) before.
- ``POST /v1/score`` (multipart field ``file``; ``?heatmap=1`` adds a PNG data URL): 200 ``{"prob", "verdict",
  "threshold", "experts": {name: prob}}``, the numbers ``infer.py`` prints for the same file. Every refusal is
  ``{"error": "..."}`` with a 4xx status, or 503/504 for load and time limits (see :func:`status_of`).
- ``GET /``: the web page (``service/static/index.html``).

The model is loaded once, in a background thread started by the app's lifespan, so ``/health`` answers 503
while it loads. Load is bounded: at most ``workers x batch_size`` requests are scored at once and ``queue``
wait (uploads being received count as waiting); past that a request gets 503 with ``Retry-After`` before its
body is read. Each request has ``timeout`` seconds from its arrival to its answer (504 when the scoring is
late, 408 when the upload is), and an upload of more than ``max_bytes`` is refused (413) as soon as the stream
shows it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .scorer import Busy, FeatureMissing, Job, Scorer, optional_features
from .uploads import UploadError, read_upload

log = logging.getLogger("service")

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BYTES = 25 * 2**20
RETRY_AFTER_S = 1


def status_of(error: BaseException) -> int:
    """The HTTP status for a file the scorer refused (an ``ImageLoadError``, or a ``VideoLoadError``).

    400: empty or damaged (truncated, corrupt); 413: more pixels than ``core.images.MAX_PIXELS`` (a
    decompression bomb), video frames too large or a video too long; 415: neither an image nor a video, or a
    format this installation cannot read.
    """
    reason = getattr(error, "reason", str(error))
    if reason.startswith(("image too large", "video frames too large", "video too long")):
        return 413
    if reason.startswith(("not an image file", "not a video file", "no video stream")) \
            or "need the pillow-heif" in reason or "AVIF" in reason:
        return 415
    return 400


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _busy(message: str) -> JSONResponse:
    return _error(503, message, {"Retry-After": str(RETRY_AFTER_S)})


class Service:
    """What the routes share: the settings, the model once loaded, its scorer, and the load counter."""

    def __init__(self, weights: str | Path, *, device: str = "cpu", threads: int = 0, workers: int = 1,
                 queue: int = 8, batch_size: int = 8, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0,
                 tmp_dir: str | Path | None = None, video_frames: int = 16, video_agg: str = "mean",
                 ensemble: Any = None):
        from experts.weights import MANIFEST, manifest_threshold, read_manifest, scores_fingerprint

        if workers < 1 or queue < 1 or batch_size < 1 or max_bytes < 1 or timeout <= 0 or threads < 0 \
                or video_frames < 1 or video_agg not in ("mean", "max", "topk"):
            raise ValueError("workers, queue, batch size, max bytes and video frames must be at least 1, the "
                             "timeout positive, threads at least 0, the video aggregation mean, max or topk")
        self.weights = Path(weights)
        manifest = read_manifest(self.weights)  # a bad folder fails here, at once, not in the background
        self.info = {
            "model": manifest.get("name") or " + ".join(e["key"] for e in manifest["experts"]),
            "fingerprint": scores_fingerprint(manifest),
            "experts": [e["key"] for e in manifest["experts"]],
            "threshold": manifest_threshold(manifest, self.weights / MANIFEST),
        }
        self.device, self.threads, self.workers, self.queue = device, threads, workers, queue
        self.batch_size, self.max_bytes, self.timeout = batch_size, max_bytes, timeout
        self.tmp_dir, self.video_frames, self.video_agg = tmp_dir, video_frames, video_agg
        self.heatmap_fn, self.video_fn = optional_features()
        self.no_heatmap = "heatmaps are not available in this installation (scoring/heatmaps.py is missing)"
        if any(e.get("backend", "pytorch") != "pytorch" for e in manifest["experts"]):
            self.heatmap_fn = None  # ONNX graphs give no gradients to map
            self.no_heatmap = (f"heatmaps need the experts' gradients, and {self.weights} holds ONNX graphs: "
                               "serve the PyTorch weights folder they were exported from for heatmaps")
        self.ensemble = ensemble
        self.scorer: Scorer | None = None
        self.load_error = ""
        self.capacity = workers * batch_size + queue
        self.active = 0  # requests admitted and not yet answered (the event loop's thread alone changes it)
        self._loader: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.scorer is not None

    def start(self) -> None:
        """Load the model (unless given) and start the scorer, in a background thread."""
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            from core.device import cpu_count, resolve_device, set_threads

            device = resolve_device(self.device)
            # Set once, before any worker runs: the workers' forward passes share the CPUs between them.
            threads = set_threads(self.threads or max(1, cpu_count() // self.workers))
            if self.ensemble is None:
                from experts import load_ensemble

                self.ensemble = load_ensemble(self.weights, device)
            scorer = Scorer(self.ensemble, workers=self.workers, queue_size=self.queue, batch_size=self.batch_size,
                            device=str(device), tmp_dir=self.tmp_dir, video_frames=self.video_frames,
                            video_agg=self.video_agg,
                            heatmap_fn=self.heatmap_fn, video_fn=self.video_fn)
            scorer.start()
            self.scorer = scorer
            log.info("model %s loaded (%d scoring workers, %d torch threads, device %s)",
                     self.info["model"], self.workers, threads, device)
        except Exception as e:  # noqa: BLE001  reported by /health; the server keeps answering
            log.exception("the model could not be loaded")
            self.load_error = f"{type(e).__name__}: {e}"

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def stop(self) -> None:
        if self._loader is not None:
            self._loader.join()
        if self.scorer is not None:
            self.scorer.stop()

    def health(self) -> JSONResponse:
        features = {"heatmap": self.heatmap_fn is not None, "video": self.video_fn is not None}
        limits = {"max_bytes": self.max_bytes, "timeout_s": self.timeout, "workers": self.workers,
                  "batch_size": self.batch_size, "queue": self.queue}
        if self.ready:
            return JSONResponse({"status": "ok", **self.info, "features": features, "limits": limits})
        if self.load_error:
            return JSONResponse({"status": "error", "error": self.load_error, **self.info}, status_code=503)
        return JSONResponse({"status": "loading", **self.info}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    async def score(self, request: Request, heatmap: bool) -> JSONResponse:
        if not self.ready:
            if self.load_error:
                return _error(503, f"the model could not be loaded: {self.load_error}")
            return _busy("the model is loading; retry in a moment")
        if self.active >= self.capacity:
            return _busy(f"busy: {self.active} requests in progress (the limit is {self.capacity}); retry later")
        if heatmap and self.heatmap_fn is None:
            return _error(501, self.no_heatmap)
        self.active += 1
        try:
            return await self._score(request, heatmap)
        finally:
            self.active -= 1

    async def _score(self, request: Request, heatmap: bool) -> JSONResponse:
        from core.images import ImageLoadError

        start = asyncio.get_running_loop().time()
        try:
            upload = await asyncio.wait_for(read_upload(request.headers, request.stream(), self.max_bytes),
                                            self.timeout)
        except UploadError as e:
            return _error(e.status, e.message)
        except TimeoutError:
            return _error(408, f"the upload took longer than the time limit ({self.timeout:g} s)")
        except ClientDisconnect:
            return _error(400, "the client went away during the upload")  # nobody reads it; no traceback logged
        name = Path(upload.filename or "upload").name or "upload"
        job = Job(upload.data, name, upload.content_type, heatmap)
        del upload
        try:
            future = self.scorer.submit(job)
        except Busy as e:
            return _busy(f"busy: {e}; retry later")
        left = self.timeout - (asyncio.get_running_loop().time() - start)
        waiting = asyncio.wrap_future(future)
        # A job that ends after its request gave up: its outcome is read here, so that asyncio does not log an
        # error nobody awaited ("Future exception was never retrieved").
        waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            # shield: a timeout cancels the wait, not the concurrent Future (cancelled below if still queued)
            result = await asyncio.wait_for(asyncio.shield(waiting), max(left, 0.001))
        except TimeoutError:
            future.cancel()  # a job still in the queue is skipped; one being scored runs to its end
            return _error(504, f"scoring took longer than the time limit ({self.timeout:g} s)")
        except ImageLoadError as e:
            return _error(status_of(e), str(e))
        except FeatureMissing as e:
            return _error(e.status, str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  a video module's refusal, or a bug: never a crashed server
            if isinstance(e, (ValueError, OSError)):
                return _error(status_of(e), f"{name}: {e}")
            log.exception("scoring %s failed", name)
            return _error(500, f"internal error while scoring {name} ({type(e).__name__})")
        return JSONResponse(result)


def create_app(weights: str | Path, *, device: str = "cpu", threads: int = 0, workers: int = 1, queue: int = 8,
               batch_size: int = 8, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0,
               tmp_dir: str | Path | None = None, video_frames: int = 16, video_agg: str = "mean",
               ensemble: Any = None) -> FastAPI:
    """The service for the weights folder ``weights`` (see the module's doc for the routes and limits).

    ``ensemble``, when given, is used instead of loading ``weights`` (whose manifest still gives the model's
    description); tests pass one to skip the load. The app's ``state.service`` is the :class:`Service`.
    """
    service = Service(weights, device=device, threads=threads, workers=workers, queue=queue, batch_size=batch_size,
                      max_bytes=max_bytes, timeout=timeout, tmp_dir=tmp_dir, video_frames=video_frames,
                      video_agg=video_agg, ensemble=ensemble)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="Deepfake detector", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return _error(422, f"invalid request ({problems})")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__})")

    @app.get("/health")
    async def health() -> JSONResponse:
        return service.health()

    @app.post("/v1/score")
    async def score(request: Request, heatmap: bool = False) -> JSONResponse:
        return await service.score(request, heatmap)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    return app
