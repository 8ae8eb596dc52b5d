"""The FastAPI app: OpenAI's error JSON for every failure, the API key check, the engine's lifetime, and the
small endpoints (health, metrics, models, SGLang's weight reload for RL); the generation routes come from k2lab.serve.completions and
k2lab.serve.responses."""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2lab.serve import completions, responses
from k2lab.serve.protocol import APIError, UpdateWeightsFromDiskRequest
from k2lab.serve.weights import update_weights_from_disk

if TYPE_CHECKING:
    from k2lab.serve.server import Server


def _validation_message(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"] if p != "body")
    if err["type"] == "extra_forbidden":  # a field this server does not implement: never silently ignored
        return f"`{where}` is not supported by this server; remove it"
    return f"{where}: {err['msg']}"


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        server.draining = True
        # HTTP work is over (finished, or cancelled by uvicorn after the drain timeout, which cancels its
        # engine requests); anything still in the engine is aborted after a short grace
        await asyncio.to_thread(server.engine.shutdown, True, 1.0)

    app = FastAPI(title="k2lab", version="0.1.0", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        where = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else ""
        msgs = "; ".join(map(_validation_message, errors))
        return JSONResponse(APIError(400, msgs or "invalid request", param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    async def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer KEY`).",
                           "invalid_api_key")

    @app.get("/health")
    async def health():
        if server.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "k2lab",
                "max_model_len": server.engine.max_len}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        if model_id != server.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves `{server.model_name}`.",
                           "model_not_found", "model")
        return model_card()

    @app.post("/update_weights_from_disk", dependencies=[Depends(authorized)])
    async def update_weights(body: UpdateWeightsFromDiskRequest):
        """SGLang's weight reload (RL's weight sync): 200 with success true, or 400 with success false."""
        ok, message, paused = await asyncio.to_thread(update_weights_from_disk, server.engine, body.model_path,
                                                      body.abort_all_requests)
        return JSONResponse({"success": ok, "message": message, "num_paused_requests": paused},
                            status_code=200 if ok else 400)

    completions.register(app, server, authorized)
    responses.register(app, server, authorized)
    return app
