"""The OpenAI Chat Completions format, as the server reads and writes it.

A request's messages: an optional `system` (or `developer`) message, the instruction turn (as `diva chat
--prompt`), then one `user` message whose content parts are `input_audio` (`{"data": base64, "format": "wav" |
"mp3" | "flac" | "ogg" | ...}`) and optionally `text`. The student answers speech: exactly one audio part, and a
text part only as an instruction (it joins the system turn). Earlier `assistant` turns are not supported (the
student was trained on single turns): a 400 says so rather than dropping them.

Every problem is a RequestError (HTTP status, message, OpenAI error type, the offending `param`), which the
server sends as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from diva.audio import AudioError, load_audio
from diva.serve.engine import Sampling
from diva.student.inference.generate import SAMPLE_RATE

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "aiff")  # what libsndfile decodes (input_audio.format)
SAMPLING_KEYS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed")
IGNORED_KEYS = {"model", "messages", "stream", "stream_options", "modalities", "audio", "n", "user",
                "frequency_penalty", "presence_penalty", "logit_bias", "metadata", "store"}  # fmt: skip


class RequestError(Exception):
    """A request the server cannot answer: sent as an OpenAI-style error with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 25 << 20  # the upload (OpenAI's audio limit is 25 MB)
    max_audio_s: float = 120.0  # longer clips are 413; up to this, 30 s chunks as `diva generate` encodes them
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256


@dataclass(frozen=True)
class ChatRequest:
    """A parsed request: the audio (16 kHz mono float32), the instruction, sampling and output options."""

    audio: np.ndarray
    instruction: str | None
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries usage
    speak: bool  # modalities has "audio": the answer also comes as speech
    voice: str | None
    audio_format: str


def _number(body: dict, key: str, low: float, high: float, integer: bool = False) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {kind} in [{low}, {high}], got {value!r}", key)
    return value


def _sampling(body: dict, limits: Limits) -> Sampling:
    max_tokens = _number(body, "max_completion_tokens", 1, limits.max_tokens, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, limits.max_tokens, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise RequestError(400, "'top_p' must be greater than 0", "top_p")
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(400, f"'n' must be 1 (one answer per request), got {n!r}", "n")
    return Sampling(max_tokens=int(max_tokens or limits.default_max_tokens), temperature=float(temperature or 0.0),
                    top_p=float(1.0 if top_p is None else top_p), seed=None if seed is None else int(seed) % 2**63,
                    stop=tuple(stop or ()))  # fmt: skip


def _text_of(content: Any, param: str) -> str:
    """A system message's text: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise RequestError(400, "a system message's content must be a string or a list of text parts", param)


def decode_audio(part: dict, param: str, limits: Limits) -> np.ndarray:
    """An input_audio part's samples: 16 kHz mono float32; RequestError naming what is wrong."""
    audio = part.get("input_audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise RequestError(400, "an input_audio part needs {'input_audio': {'data': base64, 'format': ...}}",
                           f"{param}.input_audio")  # fmt: skip
    fmt = audio.get("format")
    if fmt not in AUDIO_FORMATS:
        raise RequestError(400, f"unknown audio format {fmt!r}; send one of {', '.join(AUDIO_FORMATS)}",
                           f"{param}.input_audio.format")  # fmt: skip
    try:
        data = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"input_audio.data is not valid base64 ({e})", f"{param}.input_audio.data") from e
    if not data:
        raise RequestError(400, "input_audio.data is empty", f"{param}.input_audio.data")
    try:
        samples, _ = load_audio(data, SAMPLE_RATE, name=f"input_audio ({fmt})")
    except AudioError as e:
        raise RequestError(400, f"cannot decode the audio: {e}", f"{param}.input_audio.data") from e
    if samples.size == 0:
        raise RequestError(400, "the audio has no samples", f"{param}.input_audio.data")
    seconds = samples.size / SAMPLE_RATE
    if seconds > limits.max_audio_s:
        raise RequestError(413, f"the audio is {seconds:.1f} s long; this server takes up to {limits.max_audio_s:g} s",
                           f"{param}.input_audio.data", code="audio_too_long")  # fmt: skip
    return samples


def _user_turn(message: dict, param: str, limits: Limits) -> tuple[np.ndarray, str | None]:
    content = message.get("content")
    if not isinstance(content, list):
        raise RequestError(400, "the user message's content must be a list of parts with one input_audio part "
                                "(this model answers speech)", f"{param}.content")  # fmt: skip
    audio, texts = None, []
    for i, part in enumerate(content):
        where = f"{param}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_audio":
            if audio is not None:
                raise RequestError(400, "send one input_audio part per request", where)
            audio = decode_audio(part, where, limits)
        elif kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(400, "a text part needs a 'text' string", f"{where}.text")
            texts.append(part["text"])
        else:
            raise RequestError(400, f"unsupported content part type {kind!r}; use input_audio or text", f"{where}.type")
    if audio is None:
        raise RequestError(400, "the user message has no input_audio part (this model answers speech)",
                           f"{param}.content")  # fmt: skip
    return audio, "\n".join(t for t in texts if t.strip()) or None


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """A JSON body -> ChatRequest, or RequestError (see the module docstring)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    unknown = sorted(set(body) - IGNORED_KEYS - set(SAMPLING_KEYS) - {"top_logprobs", "logprobs"})
    if unknown:
        raise RequestError(400, f"unsupported parameter(s): {', '.join(unknown)}", unknown[0])
    if body.get("logprobs"):
        raise RequestError(400, "logprobs are not supported by this server", "logprobs")
    sampling = _sampling(body, limits)  # before the audio: the cheap checks first
    system, user = [], None
    for i, message in enumerate(messages):  # the roles first, the audio (the costly part) after
        param = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content"), f"{param}.content"))
        elif role == "user":
            if user is not None:
                raise RequestError(400, "send one user message (the student answers single turns)", param)
            user = (message, param)
        elif role == "assistant":
            raise RequestError(400, "multi-turn conversations are not supported: the student answers one spoken "
                                    "turn; send the system and the user message only", f"{param}.role")  # fmt: skip
        else:
            raise RequestError(400, f"unknown role {role!r}", f"{param}.role")
    if user is None:
        raise RequestError(400, "no user message with audio", "messages")
    audio, user_text = _user_turn(*user, limits)
    instruction = "\n".join(t for t in [*system, user_text or ""] if t.strip()) or None
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= {"text", "audio"}:
        raise RequestError(400, "'modalities' must be a list of 'text' and 'audio'", "modalities")
    speak = "audio" in modalities
    out_audio = body.get("audio") or {}
    if speak and not isinstance(out_audio, dict):
        raise RequestError(400, "'audio' must be an object {'voice': ..., 'format': 'wav'}", "audio")
    audio_format = out_audio.get("format", "wav") if speak else "wav"
    if audio_format != "wav":
        raise RequestError(400, f"audio.format {audio_format!r} is not supported; use 'wav'", "audio.format")
    stream_options = body.get("stream_options") or {}
    return ChatRequest(audio=audio, instruction=instruction, sampling=sampling,
                       stream=bool(body.get("stream", False)), include_usage=bool(stream_options.get("include_usage")),
                       speak=speak, voice=out_audio.get("voice") if speak else None,
                       audio_format=audio_format)  # fmt: skip


# --- responses -------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def spoken(wav_b64: str, transcript: str) -> dict[str, Any]:
    """message.audio in OpenAI's shape."""
    return {"id": f"audio_{uuid.uuid4().hex[:16]}", "data": wav_b64, "expires_at": int(time.time()) + 3600,
            "transcript": transcript}  # fmt: skip


def completion(cid: str, model: str, text: str, finish_reason: str, use: dict, audio: dict | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if audio is not None:
        message["audio"] = audio
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": use}  # fmt: skip


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, use: dict | None = None,
          choices: bool = True) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                           if choices else []}  # fmt: skip
    if use is not None:
        out["usage"] = use
    return out
