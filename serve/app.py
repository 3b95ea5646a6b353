"""The HTTP side: a FastAPI app speaking the OpenAI Chat Completions API, and the web page.

    POST /v1/chat/completions   body -> parse_chat_request (a 4xx RequestError on bad input) -> Job -> Batcher
                                -> one JSON answer, or server-sent events (OpenAI chunks, then `data: [DONE]`)
    GET  /v1/models, /health    the served model; queue and batch state
    GET  /                      the web page (record or drop a clip, watch the answer stream in, hear it spoken)

The body is read with a size limit before it is parsed (413 past it); audio is decoded off the event loop. A full
queue is a 503 with Retry-After. A client that goes away mid-stream cancels its row at the next decoding step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from diva.errors import UserError
from diva.serve.engine import Batcher, Busy, Done, Event, Failed, Job, Piece
from diva.serve.protocol import (
    ChatRequest,
    Limits,
    RequestError,
    chunk,
    completion,
    completion_id,
    parse_chat_request,
    spoken,
    usage,
)
from diva.serve.speech import spoken_wav, voice_spec

RETRY_AFTER_S = 1


def error_response(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared)} bytes; the limit is {limit}",
                           code="request_too_large")  # fmt: skip
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


class Session:
    """One request's job and the asyncio queue its events arrive on (from the batcher's thread)."""

    def __init__(self, batcher: Batcher, chat: ChatRequest) -> None:
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.job = Job(chat.audio, chat.instruction, chat.sampling,
                       emit=lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event))  # fmt: skip
        batcher.submit(self.job)  # Busy when the queue is full

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, Done | Failed):
                return


def create_app(model_id: str, batcher: Batcher, limits: Limits | None = None, default_voice: str = "slt"
               ) -> FastAPI:  # fmt: skip
    """The app serving the model `batcher` runs (a SpeechModel, or anything with its `run`) as `model_id`; the
    batcher is closed (drained) when the app shuts down."""
    limits = limits or Limits()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(batcher.close, True)  # uvicorn has finished the open requests by now

    app = FastAPI(title="diva serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(RequestError(error.status_code, str(error.detail), kind=kind))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(RequestError(400, str(error)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "waiting": batcher.waiting, "running": batcher.running,
                "batches": len(batcher.batches)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "diva"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return files("diva.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})") from e
        if isinstance(body, dict) and body.get("model") not in (None, model_id):
            raise RequestError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                    f"{model_id!r} (GET /v1/models)", "model", code="model_not_found")  # fmt: skip
        chat = await run_in_threadpool(parse_chat_request, body, limits)
        voice = await run_in_threadpool(_voice, chat.voice, default_voice) if chat.speak else None
        try:
            session = Session(batcher, chat)
        except Busy as e:
            busy = RequestError(503, f"the server is busy ({e}); retry after {RETRY_AFTER_S} s",
                                kind="server_error", code="overloaded")  # fmt: skip
            return error_response(busy, {"Retry-After": str(RETRY_AFTER_S)})
        cid = completion_id()
        if chat.stream:
            return StreamingResponse(_stream(session, cid, model_id, chat, voice), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        async for event in session:
            if isinstance(event, Failed):
                return error_response(RequestError(500, event.message, kind="server_error"))
            if isinstance(event, Done):
                audio = await _speech(event.text, voice) if voice else None
                return completion(cid, model_id, event.text, event.finish_reason,
                                  usage(event.prompt_tokens, event.completion_tokens), audio)  # fmt: skip
        raise AssertionError("a session ends with Done or Failed")

    return app


def _voice(voice: str | None, default: str) -> str:
    try:
        return voice_spec(voice, default)
    except UserError as e:  # SynthError: an unknown voice
        raise RequestError(400, str(e), "audio.voice") from e


async def _speech(text: str, voice: str) -> dict[str, Any]:
    wav = await run_in_threadpool(spoken_wav, text, voice)
    return spoken(base64.b64encode(wav).decode("ascii"), text)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(session: Session, cid: str, model_id: str, chat: ChatRequest, voice: str | None):
    """Server-sent events in OpenAI's chunk format: the role, content deltas, the finish reason (with the spoken
    answer as an audio delta when asked), a usage chunk when stream_options.include_usage, then [DONE]."""
    try:
        yield _sse(chunk(cid, model_id, {"role": "assistant", "content": ""}))
        async for event in session:
            if isinstance(event, Piece):
                yield _sse(chunk(cid, model_id, {"content": event.text}))
            elif isinstance(event, Failed):
                yield _sse(RequestError(500, event.message, kind="server_error").body())
            else:
                if voice:
                    yield _sse(chunk(cid, model_id, {"audio": await _speech(event.text, voice)}))
                yield _sse(chunk(cid, model_id, {}, event.finish_reason))
                if chat.include_usage:
                    yield _sse(chunk(cid, model_id, {}, use=usage(event.prompt_tokens, event.completion_tokens),
                                     choices=False))  # fmt: skip
        yield "data: [DONE]\n\n"
    finally:
        session.job.cancelled = True  # the client went away (or the answer is complete): stop decoding its row
