"""The HTTP API (FastAPI): upload, status, metrics, merged model, manifest, health.

``POST /checkpoints?name=NAME`` takes the raw safetensors bytes as the body, streamed to the
spool in chunks under a size limit, and answers 202 with an id once the upload is durable.
Everything but ``/healthz`` needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import IO, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .auth import bearer_check
from .metrics import CONTENT_TYPE
from .service import MergeService, UploadRejected
from .spool import BadName, check_name

log = logging.getLogger("contmerge.server")
WRITE_BLOCK = 1 << 20  # gather the body into ~1 MiB writes, done off the event loop
READ_BLOCK = 1 << 20


def _write(handle: IO[bytes], digest: Any, data: bytes | bytearray) -> None:
    digest.update(data)
    handle.write(data)


def _refused(exc: UploadRejected) -> JSONResponse:
    record = exc.record
    return JSONResponse(
        {"id": record["id"], "status": "rejected", "reason": record["reason"]},
        status_code=exc.status_code,
    )


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
        x_checkpoint_name: str | None = Header(default=None),
    ) -> Response:
        raw_name = name or x_checkpoint_name or "checkpoint"
        checkpoint_id = service.spool.new_id()
        limit = service.settings.max_upload_bytes
        try:
            safe_name = check_name(raw_name)
        except BadName as exc:
            return _refused(
                await run_in_threadpool(
                    service.reject_upload, 400, checkpoint_id, raw_name, str(exc)
                )
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            # refused before reading: with "Expect: 100-continue" (curl) nothing is even sent
            return _refused(
                await run_in_threadpool(
                    service.reject_upload,
                    413,
                    checkpoint_id,
                    safe_name,
                    f"upload of {declared} bytes is over the limit of {limit} bytes",
                )
            )
        if not service.reserve_upload():
            seconds = service.retry_after()
            return JSONResponse(
                {"status": "busy", "reason": "queue full, retry later", "retry_after": seconds},
                status_code=503,
                headers={"Retry-After": str(seconds)},
            )
        return await _receive(request, checkpoint_id, safe_name, limit)

    async def _receive(request: Request, checkpoint_id: str, name: str, limit: int) -> Response:
        temp, handle = service.spool.open_temp(checkpoint_id)
        queued = False
        try:
            digest = hashlib.sha256()
            size = 0
            pending = bytearray()
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return _refused(
                        await run_in_threadpool(
                            service.reject_upload,
                            413,
                            checkpoint_id,
                            name,
                            f"upload is over the limit of {limit} bytes",
                        )
                    )
                pending += chunk
                if len(pending) >= WRITE_BLOCK:
                    data, pending = pending, bytearray()
                    await run_in_threadpool(_write, handle, digest, data)
            await run_in_threadpool(_write, handle, digest, pending)
            client = request.client.host if request.client else None
            record = await run_in_threadpool(
                service.accept_upload,
                temp,
                handle,
                checkpoint_id,
                name,
                size,
                digest.hexdigest(),
                client,
            )
            queued = True
        except UploadRejected as exc:
            return _refused(exc)
        except ClientDisconnect:
            log.info("upload %s: client went away before the body was complete", checkpoint_id)
            return Response(status_code=400)
        finally:
            if not queued:
                handle.close()
                service.spool.discard(temp)
                service.queue.release()
        return JSONResponse(
            {
                "id": checkpoint_id,
                "name": name,
                "status": "queued",
                "bytes": size,
                "sha256": record["sha256"],
                "queue_depth": len(service.queue),
                "status_url": f"/uploads/{checkpoint_id}",
            },
            status_code=202,
            headers={"Location": f"/uploads/{checkpoint_id}"},
        )

    @app.get("/uploads/{checkpoint_id}", dependencies=auth)
    def upload_status(checkpoint_id: str) -> JSONResponse:
        record = service.lookup(checkpoint_id)
        if record is None:
            return JSONResponse({"id": checkpoint_id, "status": "unknown"}, status_code=404)
        status = record.get("event")
        if status == "accepted":
            current = service.board.current
            status = "folding" if current and current["id"] == checkpoint_id else "queued"
        return JSONResponse({**record, "status": status})

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
