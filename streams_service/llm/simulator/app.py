"""The HTTP layer: routes (`/v1/messages`, `count_tokens`, `/v1/models`), authentication,
HTTP faults and error bodies, and the app factory."""

from __future__ import annotations

import gc
import hashlib
import json
from typing import Any, Final

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streams_service.llm.simulator.cache import count_input_tokens
from streams_service.llm.simulator.config import MAX_BODY_BYTES, ORGANIZATION_ID, SimulatorConfig
from streams_service.llm.simulator.pacing import Pacer
from streams_service.llm.simulator.plan import plan_response, random_id
from streams_service.llm.simulator.request import (
    APIError,
    find_fault,
    invalid,
    last_user_index,
    load_json,
    parse_request,
    text_of,
)
from streams_service.llm.simulator.state import RateLimits, State
from streams_service.llm.simulator.streaming import (
    PacedResponse,
    SimulatorApp,
    event_stream,
    message_object,
    single_body,
    usage_object,
)

log = structlog.get_logger(__name__)


def _error_response(
    exc: APIError, request_id: str, extra: dict[str, str] | None = None
) -> Response:
    body = {
        "type": "error",
        "error": {"type": exc.error_type, "message": exc.message},
        "request_id": request_id,
    }
    headers = {"request-id": request_id, **(extra or {}), **exc.headers}
    return JSONResponse(body, status_code=exc.status, headers=headers)


_HTTP_FAULTS: Final[dict[str, tuple[int, str, str]]] = {
    "rate_limit": (
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization (simulated).",
    ),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server_error": (500, "api_error", "Internal server error"),
    "invalid_request": (400, "invalid_request_error", "Simulated invalid request."),
    "auth": (401, "authentication_error", "invalid x-api-key"),
}


def _check_auth(request: Request) -> None:
    authorization = request.headers.get("authorization", "")
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    if not bearer and not request.headers.get("x-api-key", "").strip():
        raise APIError(401, "authentication_error", "x-api-key header is required")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, "request_too_large", "Request exceeds the maximum allowed size.")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, "request_too_large", "Request exceeds the maximum allowed size.")
    return body


def _state(request: Request) -> State:
    state: State = request.app.state.simulator
    return state


async def _messages(request: Request) -> Response:
    state = _state(request)
    state.requests_total += 1
    request_id = random_id("req_")
    headers = {"request-id": request_id, "anthropic-organization-id": ORGANIZATION_ID}
    try:
        _check_auth(request)
        body = await _read_body(request)
        req = parse_request(load_json(body), hashlib.sha256(body).hexdigest())
        last_user = last_user_index(req.messages)
        last_text = text_of(req.messages[last_user]["content"]) if last_user is not None else ""
        spec = find_fault(last_text, request.headers.get("x-sim-fault"))
    except APIError as exc:
        return _error_response(exc, request_id, {**headers, **state.rate_limits.charge(0, 0)})

    fault: str | None = None
    if spec is not None:
        attempt = state.attempt(f"{spec.name}:{req.digest}")
        if spec.count is None or attempt <= spec.count:
            fault = spec.name
            # Only the fault name: request text never reaches the logs.
            log.info("simulator.fault", fault=fault, attempt=attempt, request_id=request_id)

    if fault in _HTTP_FAULTS:
        status, error_type, message = _HTTP_FAULTS[fault]
        retry: dict[str, str] = {}
        if status in (429, 529):
            retry = {"retry-after-ms": str(state.config.retry_after_ms)}
            if status == 429:
                # Whole seconds, rounded down: the SDK prefers retry-after-ms when present.
                retry["retry-after"] = str(state.config.retry_after_ms // 1000)
        limits = state.rate_limits.charge(0, 0, exhausted=status == 429)
        return _error_response(
            APIError(status, error_type, message, retry), request_id, {**headers, **limits}
        )

    plan = plan_response(req, state.config)
    usage = state.cache.usage_for(req)
    headers.update(
        state.rate_limits.charge(
            usage.input_tokens + usage.cache_creation + usage.cache_read, plan.output_tokens
        )
    )
    if req.stream:
        headers["content-type"] = "text/event-stream; charset=utf-8"
        headers["cache-control"] = "no-cache"
        events = event_stream(state, req, plan, usage, fault)
        return PacedResponse(state, 200, headers, events, headers_first=True)
    if fault == "midstream_error":
        # Without a stream to break, the same upstream failure surfaces as a plain 529.
        status, error_type, message = _HTTP_FAULTS["overloaded"]
        retry = {"retry-after-ms": str(state.config.retry_after_ms)}
        return _error_response(APIError(status, error_type, message, retry), request_id, headers)
    reply = message_object(
        random_id("msg_"), req.model, [b.content_block() for b in plan.blocks], plan
    )
    reply["usage"] = usage_object(usage, plan.output_tokens, plan.thinking_tokens)
    payload = json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()
    headers["content-type"] = "application/json"
    headers["content-length"] = str(len(payload))
    generation_s = Pacer(state.config.tokens_per_s, state.ticker).duration(plan.output_tokens)
    single = single_body(state, payload, generation_s, fault)
    return PacedResponse(state, 200, headers, single, headers_first=False)


async def _count_tokens(request: Request) -> Response:
    request_id = random_id("req_")
    try:
        _check_auth(request)
        data = load_json(await _read_body(request))
        count = count_input_tokens(parse_request(data, "", max_tokens_required=False))
    except APIError as exc:
        return _error_response(exc, request_id)
    return JSONResponse({"input_tokens": count}, headers={"request-id": request_id})


_MODELS: Final = (
    # (id, display name, released, line)
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-11-18T00:00:00Z", "opus"),
    ("claude-sonnet-5-5", "Claude Sonnet 5.5", "2026-10-07T00:00:00Z", "sonnet"),
    ("claude-haiku-5-5", "Claude Haiku 5.5", "2026-10-07T00:00:00Z", "haiku"),
    ("claude-sonnet-5", "Claude Sonnet 5", "2026-06-24T00:00:00Z", "sonnet"),
    ("claude-opus-4-7", "Claude Opus 4.7", "2026-04-16T00:00:00Z", "opus"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6", "2026-02-17T00:00:00Z", "sonnet"),
    ("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-01T00:00:00Z", "haiku"),
)


def _model_info(entry: tuple[str, str, str, str]) -> dict[str, Any]:
    model_id, display_name, created_at, line = entry
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": created_at,
        "lifecycle": "active",
        "line": line,
        "max_input_tokens": 1_000_000,
        "max_tokens": 128_000,
    }


async def _list_models(request: Request) -> Response:
    request_id = random_id("req_")
    try:
        _check_auth(request)
        raw_limit = request.query_params.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise invalid("limit: Input should be an integer between 1 and 1000")
    except APIError as exc:
        return _error_response(exc, request_id)
    ids = [m[0] for m in _MODELS]
    start, end = 0, len(_MODELS)
    if (after := request.query_params.get("after_id")) in ids:
        start = ids.index(after) + 1
    if (before := request.query_params.get("before_id")) in ids:
        end = ids.index(before)
    page = list(_MODELS[start:end])
    limit = int(raw_limit)
    chosen = page[-limit:] if before and not after else page[:limit]
    data = [_model_info(m) for m in chosen]
    return JSONResponse(
        {
            "data": data,
            "has_more": len(chosen) < len(page),
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        },
        headers={"request-id": request_id},
    )


async def _get_model(request: Request) -> Response:
    request_id = random_id("req_")
    try:
        _check_auth(request)
        model_id = request.path_params["model_id"]
        entry = next((m for m in _MODELS if m[0] == model_id), None)
        if entry is None:
            raise APIError(404, "not_found_error", f"model: {model_id}")
    except APIError as exc:
        return _error_response(exc, request_id)
    return JSONResponse(_model_info(entry), headers={"request-id": request_id})


async def _stats(request: Request) -> Response:
    """Not part of the API: lets tests and benchmarks see load and leaked responses."""
    state = _state(request)
    return JSONResponse(
        {
            "requests_total": state.requests_total,
            "active_responses": state.active_responses,
            "gc_frozen_objects": gc.get_freeze_count(),
        }
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    error_type = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "api_error")
    message = exc.detail if isinstance(exc, HTTPException) else "Internal server error"
    return _error_response(APIError(status, error_type, str(message)), random_id("req_"))


def create_simulator_app(config: SimulatorConfig | None = None) -> Starlette:
    """The simulator as an ASGI app; state (cache, fault counters) lives with the app."""
    config = config or SimulatorConfig()
    app = SimulatorApp(
        routes=[
            Route("/v1/messages", _messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", _count_tokens, methods=["POST"]),
            Route("/v1/models", _list_models, methods=["GET"]),
            Route("/v1/models/{model_id}", _get_model, methods=["GET"]),
            Route("/_simulator/stats", _stats, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _http_error},
    )
    app.state.simulator = State(config=config, rate_limits=RateLimits(config))
    return app
