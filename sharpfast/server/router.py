"""The HTTP API, defined once: one APIRouter with POST /generate, GET /health and GET /metrics
over a Service (the serving core) and a transport (how a parsed request reaches a pipeline
call: the uvicorn batcher, or a Ray Serve replica's batch), and the one app factory both
transports serve: the router, the schema's 422 in the declared error shape, and the middleware
that refuses what must not reach the JSON parser.

The transport has: `async submit(body, request) -> dict` (the answer, or it raises),
`health() -> dict` (its own fields of /health) and `async metrics_text() -> str`.
"""
# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
from typing import Any, Optional

from .middleware import BodyGuard
from .protocol import ERRORS, GenerateRequest, GenerateResponse
from .service import Service


def build_router(service: Service, transport: Any) -> Any:
    """The API's routes over a service and a transport."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    router = APIRouter()

    @router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
        rid = req.request_id
        try:
            body = service.parse(req.model_dump(exclude_none=True))
            outcome = await transport.submit(body, request)
        except Exception as err:  # noqa: BLE001 (every failure is answered through the one mapping)
            outcome = err
        status, payload = service.answer(outcome, rid)
        return payload if status == 200 else JSONResponse(payload, status_code=status)  # type: ignore[return-value]

    @router.get("/health")
    async def health() -> dict:
        return {**transport.health(), **service.health()}

    @router.get("/metrics", response_class=PlainTextResponse, responses={401: ERRORS[401]})
    async def metrics() -> Any:
        return PlainTextResponse(await transport.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return router


def build_app(service: Service, transport: Any, *, title: str = "sharpfast", lifespan: Optional[Any] = None) -> Any:
    """The FastAPI app both transports serve (uvicorn runs it; Ray Serve's ingress takes it)."""
    from fastapi import FastAPI

    docs = service.limits.serves_docs
    app = FastAPI(title=title, description="text-to-image generation guarded against memorization",
                  lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.include_router(build_router(service, transport))
    count_invalid(app, service)
    app.add_middleware(BodyGuard, limits=service.limits, on_refused=service.refused)
    app.state.service = service
    return app


def count_invalid(app: Any, service: Optional[Service] = None) -> None:
    """422 for a body that does not match the schema, and Starlette's own refusals (404, 405): the
    error shape every refusal has ({"error": ...}; a 422 adds FastAPI's detail without the inputs:
    never echo a large body), counted as the other statuses."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Any, exc: Any) -> Any:  # 404, 405, ...: the declared error shape too
        if service is not None:
            service.refused(exc.status_code)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, exc: Any) -> Any:
        if service is not None:
            service.refused(422)
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:300], "type": e.get("type")}
                  for e in exc.errors()[:20]]
        return JSONResponse({"error": "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail),
                             "detail": detail}, status_code=422)
