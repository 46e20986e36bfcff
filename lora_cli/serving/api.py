"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions and
/health, over one `Engine`.

Every failure a client can cause is an OpenAI-shaped JSON error with a 4xx status (requests.py),
never a traceback; anything else is a 500 in the same shape, and the server keeps serving. A
streamed answer waits for its first event before the response starts, so a request that fails at
once still gets a proper status; a client that goes away cancels its row in the batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import sys
import time
import uuid

from lora_cli.console import first_line
from lora_cli.serving.batching import Engine, Event, Job
from lora_cli.serving.prompts import chat_prompt_ids, completion_prompt_ids, fit_to_context
from lora_cli.serving.registry import Registry
from lora_cli.serving.requests import ApiError, Parsed, parse_chat, parse_completion

MAX_BODY = 1 << 20  # bytes: far more than any prompt the context holds


def create_app(registry: Registry, engine: Engine, *, api_key: str | None = None, max_body: int = MAX_BODY):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lora serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    def error_response(error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown paths, wrong methods: the same shape as ours
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    def guarded(handler):
        async def route(request: Request):
            try:
                if api_key is not None:
                    _check_key(request, api_key)
                return await handler(request)
            except ApiError as e:
                return error_response(e)
            except Exception as e:  # ours, not the client's: said in one line, and the server goes on
                print(f"lora serve: internal error: {type(e).__name__}: {first_line(e, 300)}", file=sys.stderr)
                return error_response(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))

        route.__name__ = handler.__name__
        return route

    async def models(request: Request):
        data = [{"id": name, "object": "model", "created": started, "owned_by": "lora",
                 "root": str(s.run) if s.run else name, "parent": None if s.run is None else registry.base.name}
                for name, s in registry.served.items()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request):
        parsed = parse_chat(await _read_json(request, max_body))
        served = _served(registry, parsed.model)
        ids = chat_prompt_ids(served, parsed.messages)
        return await _answer(request, parsed, served, ids, "messages", chat=True)

    async def completions(request: Request):
        parsed = parse_completion(await _read_json(request, max_body))
        served = _served(registry, parsed.model)
        ids = completion_prompt_ids(served, parsed.prompt)
        return await _answer(request, parsed, served, ids, "prompt", chat=False)

    async def _answer(request, parsed: Parsed, served, ids: list[int], param: str, *, chat: bool):
        max_tokens = fit_to_context(len(ids), parsed.sampling.max_tokens, registry.context, param)
        sampling = dataclasses.replace(parsed.sampling, max_tokens=max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(served, ids, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        engine.submit(job)
        shape = _Shape(chat, served.name)
        try:
            first = await _next(events, request, job)
        except BaseException:
            job.cancel()
            raise
        if first.kind == "error":
            raise ApiError(first.status, first.text, kind="server_error")
        if not parsed.stream:
            try:
                pieces, last = [], first
                while last.kind == "text":
                    pieces.append(last.text)
                    last = await _next(events, request, job)
            finally:
                job.cancel()  # a no-op for a finished row; frees the slot of a client that went away
            if last.kind == "error":
                raise ApiError(last.status, last.text, kind="server_error")
            return JSONResponse(shape.whole("".join(pieces), last))

        async def stream():
            try:
                if chat:
                    yield _sse(shape.chunk(role=True))
                event = first
                while True:
                    if event.kind == "text":
                        yield _sse(shape.chunk(text=event.text))
                    elif event.kind == "error":
                        yield _sse(ApiError(event.status, event.text, kind="server_error").body())
                        break
                    else:
                        yield _sse(shape.chunk(finish=event.finish_reason))
                        if parsed.include_usage:
                            yield _sse(shape.usage_chunk(event))
                        break
                    event = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "models": registry.names, **engine.stats})

    app.add_route("/v1/models", guarded(models), methods=["GET"])
    app.add_route("/v1/chat/completions", guarded(chat), methods=["POST"])
    app.add_route("/v1/completions", guarded(completions), methods=["POST"])
    app.add_route("/health", health, methods=["GET"])
    return app


def _check_key(request, api_key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                       code="invalid_api_key")


async def _read_json(request, max_body: int):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise ApiError(413, f"the request body is {int(length)} bytes, the limit is {max_body}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ApiError(413, f"the request body is over the limit of {max_body} bytes", code="request_too_large")
    if not body:
        raise ApiError(400, "the request has no body: send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({first_line(e, 120)})", code="invalid_json") from None


def _served(registry: Registry, name: str):
    served = registry.served.get(name)
    if served is None:
        raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(registry.names)}",
                       param="model", code="model_not_found")
    return served


async def _next(events, request, job: Job) -> Event:
    """The job's next event; a client that disconnected meanwhile cancels it."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "the client closed the connection") from None


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI's response objects for one answer: whole, or as stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def _usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def whole(self, text: str, done: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return {**self._base(False), "choices": [choice], "usage": self._usage(done)}

    def chunk(self, *, role: bool = False, text: str | None = None, finish: str | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, done: Event) -> dict:
        return {**self._base(True), "choices": [], "usage": self._usage(done)}
