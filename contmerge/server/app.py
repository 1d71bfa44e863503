"""The HTTP API (FastAPI): upload, status, metrics, merged model, manifest, health.

``POST /checkpoints?name=NAME`` takes the raw safetensors bytes as the body, or a tar of a
checkpoint directory (``Content-Type: application/x-tar``, ``?format=tar`` or a ``.tar`` name),
streamed to the spool in chunks under a size limit, and answers 202 with an id once the upload
is durable. A body that stops arriving for ``upload_idle_timeout`` seconds, or arrives slower
than ``upload_min_rate`` once that long has passed, is cut with 408. Everything but
``/healthz`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..errors import ContmergeError
from .auth import bearer_check
from .bodycheck import Refusal, storage_refusal
from .metrics import CONTENT_TYPE
from .service import MergeService
from .upload import Accepted

log = logging.getLogger("contmerge.server")
READ_BLOCK = 1 << 20


def _refused(refusal: Refusal, status: str | None = None) -> JSONResponse:
    """The answer to a refusal; ``status`` instead of rejected/busy (a request, not an upload)."""
    headers = {}
    body: dict[str, object] = {"status": status or refusal.status, "reason": refusal.reason}
    if refusal.checkpoint_id is not None:
        body = {"id": refusal.checkpoint_id, **body}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
        body["retry_after"] = refusal.retry_after
    return JSONResponse(body, status_code=refusal.status_code, headers=headers)


def _queued(accepted: Accepted) -> JSONResponse:
    where = f"/uploads/{accepted.id}"
    return JSONResponse(
        {
            "id": accepted.id,
            "name": accepted.name,
            "status": "queued",
            "bytes": accepted.bytes,
            "sha256": accepted.sha256,
            "queue_depth": accepted.queue_depth,
            "status_url": where,
        },
        status_code=202,
        headers={"Location": where},
    )


async def _body(request: Request) -> AsyncIterator[tuple[bytes, bool]]:
    """The request's body as ``(chunk, more to come)``; ClientDisconnect when the client goes."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        more = bool(message.get("more_body", False))
        yield message.get("body", b""), more
        if not more:
            return


def create_app(service: MergeService, token: str | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await run_in_threadpool(service.stop)

    # no interactive docs: they would be unauthenticated pages on a server that guards weights
    app = FastAPI(
        title="contmerge merge server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    auth = [Depends(bearer_check(token))]

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        if service.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "writer stopped"}, status_code=503)

    @app.post("/checkpoints", dependencies=auth, status_code=202)
    async def upload(
        request: Request,
        name: str | None = None,
        format: str | None = None,
        x_checkpoint_name: str | None = Header(default=None),
    ) -> Response:
        declared = request.headers.get("content-length", "")
        try:
            receiving = await run_in_threadpool(
                service.begin_upload,
                name or x_checkpoint_name or "checkpoint",
                request.headers.get("content-type", ""),
                format,
                int(declared) if declared.isdigit() else None,
            )
        except Refusal as refusal:
            return _refused(refusal)
        try:
            await receiving.receive(_body(request))
            client = request.client.host if request.client else None
            return _queued(await run_in_threadpool(receiving.finish, client))
        except Refusal as refusal:
            await run_in_threadpool(receiving.abort, refusal)
            return _refused(refusal)
        except ClientDisconnect:
            log.info("upload %s: client went away before the body was complete", receiving.id)
            return Response(status_code=400)
        finally:  # whatever happened (a bug, a cancelled request), give its slot and files back
            await run_in_threadpool(receiving.abort)

    @app.get("/uploads/{checkpoint_id}", dependencies=auth)
    def upload_status(checkpoint_id: str) -> JSONResponse:
        found = service.upload_status(checkpoint_id)
        if found is None:
            return JSONResponse({"id": checkpoint_id, "status": "unknown"}, status_code=404)
        return JSONResponse(found)

    @app.get("/status", dependencies=auth)
    def status() -> JSONResponse:
        return JSONResponse(service.status())

    @app.get("/metrics", dependencies=auth)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/manifest", dependencies=auth)
    def manifest() -> JSONResponse:
        return JSONResponse(service.manifest())

    @app.get("/model", dependencies=auth)
    async def model() -> Response:
        try:
            handle, info = await run_in_threadpool(service.open_merged)
        except OSError as exc:  # emitting it needs room in the state directory
            refusal = storage_refusal(exc, "the merged model")
            log.warning("GET /model: %s (%s)", refusal.reason, exc)
            return _refused(refusal, "error")
        except ContmergeError as exc:  # e.g. the merge exceeds the base's dtype: nothing written
            log.warning("GET /model: %s", exc)
            return JSONResponse({"status": "error", "reason": str(exc)}, status_code=500)
        size = os.fstat(handle.fileno()).st_size

        def blocks() -> Iterator[bytes]:
            with handle:
                while data := handle.read(READ_BLOCK):
                    yield data

        filename = f"merged-{info['generation']:08d}.safetensors"
        return StreamingResponse(
            blocks(),
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(size),
                "Content-Disposition": f'attachment; filename="{filename}"',
                "X-Contmerge-Count": str(info["count"]),
                "X-Contmerge-Generation": str(info["generation"]),
            },
        )

    return app
