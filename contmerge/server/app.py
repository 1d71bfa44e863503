"""The HTTP API (FastAPI): upload, status, metrics, merged model, manifest, health.

``POST /checkpoints?name=NAME`` takes the raw safetensors bytes as the body, or a tar of a
checkpoint directory (``Content-Type: application/x-tar``, ``?format=tar`` or a ``.tar`` name),
streamed to the spool in chunks under a size limit, and answers 202 with an id once the upload
is durable. A body that stops arriving for ``upload_idle_timeout`` seconds, or arrives slower
than ``upload_min_rate`` once that long has passed, is cut with 408. Everything but
``/healthz`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .auth import bearer_check
from .metrics import CONTENT_TYPE
from .service import MergeService
from .spool import BadName, check_name
from .upload import Refusal, Upload, body_kind

log = logging.getLogger("contmerge.server")
WRITE_BLOCK = 1 << 20  # gather the body into ~1 MiB writes, done off the event loop
READ_BLOCK = 1 << 20


def _refused(refusal: Refusal, record: dict) -> JSONResponse:
    headers = {}
    body = {"status": record.get("status", "rejected"), "reason": refusal.reason}
    if "id" in record:
        body = {"id": record["id"], **body}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
        body["retry_after"] = refusal.retry_after
    return JSONResponse(body, status_code=refusal.status_code, headers=headers)


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
    settings = service.settings

    async def refuse(refusal: Refusal, checkpoint_id: str, name: str, **fields: object) -> Response:
        record = await run_in_threadpool(
            service.refuse_upload, refusal, checkpoint_id, name, **fields
        )
        return _refused(refusal, record)

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
        raw_name = name or x_checkpoint_name or "checkpoint"
        checkpoint_id = service.spool.new_id()
        limit = settings.max_upload_bytes
        try:
            safe_name = check_name(raw_name)
        except BadName as exc:
            return await refuse(Refusal(400, str(exc)), checkpoint_id, raw_name)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # refused before reading: with "Expect: 100-continue" (curl) nothing is even sent
            reason = f"upload of {declared} bytes is over the limit of {limit} bytes"
            return await refuse(Refusal(413, reason), checkpoint_id, safe_name)
        try:
            kind = body_kind(request.headers.get("content-type", ""), format, safe_name)
            receiving = await run_in_threadpool(
                service.begin_upload,
                checkpoint_id,
                safe_name,
                kind,
                int(declared) if declared.isdigit() else None,
            )
        except Refusal as refusal:
            return await refuse(refusal, checkpoint_id, safe_name)
        try:
            await _receive(request, receiving)
            client = request.client.host if request.client else None
            record = await run_in_threadpool(receiving.finish, client)
        except Refusal as refusal:
            fields = {"bytes": receiving.size}
            return await refuse(refusal, checkpoint_id, safe_name, **fields)
        except ClientDisconnect:
            log.info("upload %s: client went away before the body was complete", checkpoint_id)
            return Response(status_code=400)
        finally:
            await run_in_threadpool(receiving.close)
        return JSONResponse(
            {
                "id": checkpoint_id,
                "name": safe_name,
                "status": "queued",
                "bytes": receiving.size,
                "sha256": record["sha256"],
                "queue_depth": len(service.queue),
                "status_url": f"/uploads/{checkpoint_id}",
            },
            status_code=202,
            headers={"Location": f"/uploads/{checkpoint_id}"},
        )

    async def _receive(request: Request, receiving: Upload) -> None:
        """Read the body into the upload; Refusal (408) for a client too slow to wait for."""
        idle, floor = settings.upload_idle_timeout, settings.upload_min_rate
        started = time.monotonic()
        pending = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(request.receive(), timeout=idle)
            except asyncio.TimeoutError:
                raise Refusal(
                    408, f"upload stalled: no data for {idle:g} s (--upload-idle-timeout)"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                receiving.check(chunk)
                pending += chunk
                if len(pending) >= WRITE_BLOCK:
                    data, pending = pending, bytearray()
                    await run_in_threadpool(receiving.write, data)
            if not message.get("more_body", False):
                break
            elapsed = time.monotonic() - started
            if floor > 0 and elapsed > idle and receiving.size < floor * elapsed:
                raise Refusal(
                    408,
                    f"upload too slow: {receiving.size} bytes in {elapsed:.0f} s, below the "
                    f"minimum of {floor:g} bytes/s (--upload-min-rate)",
                )
        await run_in_threadpool(receiving.write, pending)

    @app.get("/uploads/{checkpoint_id}", dependencies=auth)
    def upload_status(checkpoint_id: str) -> JSONResponse:
        record = service.lookup(checkpoint_id)
        if record is None:
            return JSONResponse({"id": checkpoint_id, "status": "unknown"}, status_code=404)
        status = record.get("event")
        extra = {}
        if status == "accepted":
            current, retrying = service.board.current, service.board.retrying
            if current and current["id"] == checkpoint_id:
                status = "folding"
            elif retrying and retrying["id"] == checkpoint_id:
                status, extra = "retrying", {"retry": retrying}
            else:
                status = "queued"
        return JSONResponse({**record, **extra, "status": status})

    @app.get("/status", dependencies=auth)
    def status() -> JSONResponse:
        return JSONResponse(service.status())

    @app.get("/metrics", dependencies=auth)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/manifest", dependencies=auth)
    def manifest() -> JSONResponse:
        return JSONResponse(service.manifest())

    @app.get("/model", dependencies=auth)
    async def model() -> StreamingResponse:
        handle, info = await run_in_threadpool(service.open_merged)
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
