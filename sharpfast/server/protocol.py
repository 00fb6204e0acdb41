"""The protocol: what the server accepts, declared once: the limits, and the request and response
models (the OpenAPI schema says what /generate takes; the service checks what the models cannot
say: the limits that depend on the model and the served settings).

Only the server imports this module; it needs the 'serve' extra (fastapi, pydantic).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPTS_PER_REQUEST = 64
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SEED = 2 ** 53  # seeds are in [0, 2**53): every JSON client holds them exactly


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (each refused with a 4xx naming the limit).

    Attributes:
        max_body_bytes: the request body (413 beyond).
        max_depth: JSON nesting of the body (400 beyond; parsers recurse).
        max_prompt_chars: characters per prompt (a CLIP prompt is 77 tokens, some 300 characters).
        max_prompts: prompts per request.
        max_images: images per request (prompts x num_images_per_prompt): the batch cap applies to
            one request too.
        max_side: height and width in pixels.
        max_pixels: height x width x images of one request.
        header_timeout: seconds a connection may take to send its request headers.
        body_timeout: seconds a request may take to send its whole body (a slow, short or never
            finished body holds no connection longer; 408 beyond).
        max_connections: open connections the server holds at most (503 beyond, uvicorn's
            limit_concurrency).
        max_steps: num_inference_steps at most.
        api_key: the key /generate and /metrics require as `Authorization: Bearer <key>`, or None.
        docs: serve /docs and /redoc, open to all (Swagger UI and ReDoc load their scripts from a
            public CDN); None: only when there is no api_key. /openapi.json is always served,
            behind the key unless the docs are on; /health is always open (probes).
    """

    max_body_bytes: int = 1 << 20
    max_depth: int = 16
    max_prompt_chars: int = 2000
    max_prompts: int = MAX_PROMPTS_PER_REQUEST
    max_images: int = 8
    max_side: int = 2048
    max_pixels: int = 8 << 20
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    api_key: Optional[str] = None
    max_steps: int = MAX_STEPS
    docs: Optional[bool] = None

    @property
    def serves_docs(self) -> bool:
        """Whether /docs and /redoc are served (and, with /openapi.json, open without the key)."""
        return self.api_key is None if self.docs is None else bool(self.docs)

    def open_paths(self) -> tuple:
        """The paths open without the API key."""
        return ("/health",) + (("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
                               if self.serves_docs else ())

    @classmethod
    def for_model(cls, default_size: tuple, max_batch_size: int, model: Any = None, **kw: Any) -> Limits:
        """Limits scaled to a model: sides up to 4x its own (at most 2048), a request's pixels up
        to max_batch_size images of twice its side, steps up to what its scheduler lays out (the
        adapter's max_steps)."""
        h, w = default_size
        side = min(2048, 4 * max(h, w))
        kw = {k: v for k, v in kw.items() if v is not None}
        if "max_steps" not in kw:
            kw["max_steps"] = MAX_STEPS if model is None else model.max_steps(MAX_STEPS)
        return cls(max_images=max_batch_size, max_side=side, max_pixels=max_batch_size * 4 * h * w, **kw)


Prompt = Annotated[str, Field(min_length=1, pattern=r"\S")]  # not empty, not only spaces


class GenerateRequest(BaseModel):
    """The body of POST /generate (limits beyond these, which depend on the model and the served
    settings: the server's 422 answers name them)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `true` is not a step count
    prompt: Union[Prompt, Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)]] = Field(
        description="a prompt or up to 64 prompts (each at most the server's max_prompt_chars)")
    num_inference_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: Optional[float] = Field(None, ge=-MAX_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED - 1)
    num_images_per_prompt: Optional[int] = Field(None, ge=1, le=MAX_PROMPTS_PER_REQUEST)
    height: Optional[int] = Field(None, ge=8, le=4096, multiple_of=8)
    width: Optional[int] = Field(None, ge=8, le=4096, multiple_of=8)
    request_id: Optional[str] = Field(None, max_length=200)


class Image(BaseModel):
    """One generated image of an answer."""

    prompt: str = Field(description="the image's prompt (cut to 200 characters in the answer)")
    png_base64: str
    warnings: list[str] = Field(default_factory=list, description="e.g. the tokenizer's truncation")


class GenerateResponse(BaseModel):
    """The answer of POST /generate."""

    request_id: Optional[str]
    seed: int
    images: list[Image]
    memorization: Optional[list[dict]] = Field(description="per prompt: score, threshold, its source, flagged, "
                                                           "mitigated, the mitigation and its check")
    batch_images: int = Field(description="images in the pipeline call that served this request")
    batch_requests: int = Field(description="requests in that call")
    seconds: float
    replica: Optional[str] = Field(None, description="the replica that answered (Ray Serve deployments)")


class ErrorResponse(BaseModel):
    """Every refusal and failure: one message naming the problem."""

    error: str
    request_id: Optional[str] = None


ERRORS: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not JSON text (malformed, not UTF-8, nested too deep)"},
    422: {"model": ErrorResponse, "description": "a value the server refuses (the schema's or a limit of the model "
                                                 "and the served settings), the message names it"},
          401: {"model": ErrorResponse, "description": "no or a wrong API key"},
          413: {"model": ErrorResponse, "description": "the body is larger than the server takes"},
          503: {"model": ErrorResponse, "description": "the server is shutting down: retry elsewhere"},
          500: {"model": ErrorResponse, "description": "the model failed (the server lives on)"}}
