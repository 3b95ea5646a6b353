"""`diva serve` end to end on loopback: a tiny student trained 2 steps, served by uvicorn on a free 127.0.0.1 port,
driven by the official `openai` client (plain, streaming, a spoken answer) and by raw HTTP for every bad input
(each a 4xx with an OpenAI-style error naming the problem), the 503 path with a model that blocks, batching of
requests that arrive together, stop strings, graceful shutdown, and a model folder that does not load."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from diva.audio import load_audio
from diva.cli import app as cli_app
from diva.serve.app import create_app
from diva.serve.engine import Batcher, Done, Piece, SpeechModel, StopText
from diva.serve.protocol import Limits
from diva.serve.server import free_port
from diva.student.inference.generate import generate

MAX = 6


@contextmanager
def running(app) -> Iterator[str]:
    """`app` on uvicorn in a thread on a free loopback port; stopped (gracefully) on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def wav_b64(samples: np.ndarray, rate: int = 16_000) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def audio_message(data: str, fmt: str = "wav", text: str | None = None) -> list[dict]:
    content = [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def student_dir(speech_dir: Path, tiny_whisper: Path, tiny_llama: Path, tmp_path_factory) -> Path:
    from diva.tests.test_inference_cli import trained_student

    return trained_student(speech_dir, tiny_whisper, tiny_llama, tmp_path_factory.mktemp("serve"))["dir"]


@pytest.fixture(scope="module")
def clip(speech_dir: Path) -> tuple[np.ndarray, str]:
    """A real spoken digit clip as 16 kHz samples and as base64 WAV (16-bit, so the server decodes the same)."""
    from diva.tests.test_train import _clips

    samples, _ = load_audio(speech_dir / _clips(speech_dir)[0]["file"])
    b64 = wav_b64(samples)
    return load_audio(base64.b64decode(b64))[0], b64


@pytest.fixture(scope="module")
def model(student_dir: Path) -> SpeechModel:
    return SpeechModel(student_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model: SpeechModel) -> Iterator[tuple[str, Batcher]]:
    batcher = Batcher(model, max_batch=4, max_queue=16, collect_s=0.05)
    app = create_app("diva-tiny", batcher, Limits(max_body_bytes=3 << 20, max_audio_s=40))
    with running(app) as url:
        yield url, batcher


def direct_answer(model: SpeechModel, samples: np.ndarray, max_tokens: int = MAX) -> str:
    result = generate(model.student, [samples], max_new_tokens=max_tokens, tokenizer=model.tokenizer,
                      feature_extractor=model.feature_extractor, trim_mel=model.trim_mel)  # fmt: skip
    return result.texts[0], len(result.token_ids[0])


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(server) -> None:
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["diva-tiny"]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "diva-tiny"


def test_openai_client_gets_the_students_answer(server, model, clip) -> None:
    url, _ = server
    samples, b64 = clip
    reply = client(url).chat.completions.create(model="diva-tiny", messages=audio_message(b64), max_tokens=MAX)
    expected, n = direct_answer(model, samples)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == n
    audio_tokens = model.tokens_per_chunk  # one 30 s chunk
    assert reply.usage.prompt_tokens == model.prompt_tokens(None) + audio_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + n


def test_streaming_sends_the_same_answer_in_chunks(server, model, clip) -> None:
    url, _ = server
    samples, b64 = clip
    stream = client(url).chat.completions.create(model="diva-tiny", messages=audio_message(b64), max_tokens=MAX,
                                                 stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct_answer(model, samples)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == direct_answer(model, samples)[1]
    raw = httpx.post(f"{url}/v1/chat/completions", json={"model": "diva-tiny", "messages": audio_message(b64),
                     "max_tokens": 2, "stream": True}, timeout=60).text  # fmt: skip
    assert raw.rstrip().endswith("data: [DONE]")


def test_spoken_answer_is_a_wav_of_the_answer(server, clip) -> None:
    url, _ = server
    _, b64 = clip
    reply = client(url).chat.completions.create(model="diva-tiny", messages=audio_message(b64), max_tokens=MAX,
                                                modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    message = reply.choices[0].message
    assert message.audio.transcript == message.content
    samples, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)))
    assert rate > 0 and samples.size > 0


def test_chat_speak_writes_the_answer_as_speech(student_dir: Path, speech_dir: Path, tmp_path: Path) -> None:
    from diva.tests.test_train import _clips

    out = tmp_path / "answer.wav"
    result = CliRunner().invoke(cli_app, ["chat", str(speech_dir / _clips(speech_dir)[0]["file"]), "--model",
                                          str(student_dir), "--max-new-tokens", "4", "--speak", str(out),
                                          "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    samples, rate = sf.read(out)
    assert samples.size > 0 and rate > 0


def test_a_system_message_becomes_the_instruction(server, model, clip) -> None:
    url, _ = server
    samples, b64 = clip
    messages = [{"role": "system", "content": "Answer briefly."}, *audio_message(b64)]
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "diva-tiny", "messages": messages,
                       "max_tokens": MAX}, timeout=60).json()  # fmt: skip
    expected = generate(model.student, [samples], "Answer briefly.", MAX, tokenizer=model.tokenizer,
                        feature_extractor=model.feature_extractor, trim_mel=model.trim_mel)  # fmt: skip
    assert reply["choices"][0]["message"]["content"] == expected.texts[0]
    assert reply["usage"]["prompt_tokens"] == model.prompt_tokens("Answer briefly.") + model.tokens_per_chunk


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    "body, status, param, says",
    [
        ("{not json", 400, None, "not valid JSON"),
        ({"model": "diva-tiny", "messages": []}, 400, "messages", "non-empty"),
        ({"model": "other", "messages": audio_message("AAAA")}, 404, "model", "does not exist"),
        ({"model": "diva-tiny", "messages": [{"role": "user", "content": "hello"}]}, 400, "messages[0].content",
         "input_audio"),
        ({"model": "diva-tiny", "messages": audio_message("")}, 400, "messages[0].content[0].input_audio.data",
         "empty"),
        ({"model": "diva-tiny", "messages": audio_message("%%%")}, 400, "messages[0].content[0].input_audio.data",
         "base64"),
        ({"model": "diva-tiny", "messages": audio_message(base64.b64encode(b"RIFF not audio at all").decode())}, 400,
         "messages[0].content[0].input_audio.data", "cannot decode"),
        ({"model": "diva-tiny", "messages": audio_message("AAAA", fmt="xyz")}, 400,
         "messages[0].content[0].input_audio.format", "unknown audio format"),
        ({"model": "diva-tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0].type", "unsupported content part"),
        ({"model": "diva-tiny", "messages": audio_message(wav_b64(np.zeros(0, np.float32)))}, 400,
         "messages[0].content[0].input_audio.data", None),
        ({"model": "diva-tiny", "messages": audio_message("AAAA"), "temperature": 5}, 400, "temperature", "[0, 2]"),
        ({"model": "diva-tiny", "messages": audio_message("AAAA"), "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": "diva-tiny", "messages": audio_message("AAAA"), "n": 2}, 400, "n", None),
        ({"model": "diva-tiny", "messages": [*audio_message("AAAA"), {"role": "assistant", "content": "x"}]}, 400,
         "messages[1].role", "multi-turn"),
        ({"model": "diva-tiny", "messages": audio_message("AAAA"), "tools": []}, 400, "tools", "unsupported"),
    ],
)
def test_bad_requests_get_openai_style_errors(server, body, status, param, says) -> None:
    url, _ = server
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    error = _error(httpx.post(f"{url}/v1/chat/completions", timeout=30, **kw), status, param)
    if says:
        assert says in error["message"], error


def test_limits_on_size_and_duration(server, model, clip) -> None:
    url, _ = server
    samples, _ = clip
    noise = (np.random.default_rng(0).standard_normal(16_000 * 60) * 0.1).astype(np.float32)  # 60 s: ~1.9 MB
    big = _error(httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "diva-tiny", "messages": audio_message(wav_b64(np.concatenate([noise, noise])))}), 413)  # fmt: skip
    assert "limit" in big["message"]
    long = _error(httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "diva-tiny", "messages": audio_message(wav_b64(noise[: 16_000 * 45]))}), 413)  # fmt: skip
    assert "45.0 s" in long["message"] and long["code"] == "audio_too_long"
    two_chunks = np.concatenate([samples, np.zeros(16_000 * 33, np.float32)])  # 30 s chunks up to the limit
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "diva-tiny", "messages": audio_message(wav_b64(two_chunks)), "max_tokens": 2}).json()  # fmt: skip
    assert ok["usage"]["prompt_tokens"] == model.prompt_tokens(None) + 2 * model.tokens_per_chunk


def test_requests_that_arrive_together_are_batched(server, model, clip) -> None:
    url, batcher = server
    samples, b64 = clip
    before = len(batcher.batches)
    with httpx.Client(timeout=120) as http:
        threads, replies = [], [None] * 4

        def ask(i: int) -> None:
            replies[i] = http.post(f"{url}/v1/chat/completions", json={
                "model": "diva-tiny", "messages": audio_message(b64), "max_tokens": MAX})  # fmt: skip

        for i in range(4):
            threads.append(threading.Thread(target=ask, args=(i,)))
            threads[-1].start()
        for t in threads:
            t.join()
    assert all(r.status_code == 200 for r in replies)
    assert max(batcher.batches[before:]) > 1  # some arrived within the collect window and ran together
    assert sum(batcher.batches[before:]) == 4


def test_stop_strings_end_the_answer_and_never_reach_the_client(server, model, clip) -> None:
    url, _ = server
    samples, b64 = clip
    full = direct_answer(model, samples, 12)[0]
    if len(full) < 4:
        pytest.fail(f"the tiny student's answer is too short to cut: {full!r}")
    stop = full[2:4]
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "diva-tiny", "messages": audio_message(b64), "max_tokens": 12, "stop": [stop]}).json()  # fmt: skip
    assert reply["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_stop_text_holds_back_what_may_become_a_stop_string() -> None:
    stops = StopText(["END"])
    assert stops.add("abc E", final=False) == ("abc ", False)
    assert stops.add("N", final=False) == ("", False)
    assert stops.add("Dx", final=False) == ("", True)
    assert stops.text == "abc "
    other = StopText(["END"])
    assert other.add("abE", final=False) == ("ab", False)
    assert other.add("x", final=True) == ("Ex", False)


class BlockingModel:
    """Stands in for SpeechModel: each batch waits until the test releases it, then answers "ok"."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def prompt_tokens(self, instruction) -> int:
        return 0

    def run(self, jobs) -> None:
        self.started.set()
        self.release.wait(60)
        for job in jobs:
            job.emit(Piece("ok"))
            job.emit(Done("ok", "stop", 1, 1))


def test_a_full_queue_answers_503_with_retry_after_and_shutdown_finishes_running_requests(clip) -> None:
    _, b64 = clip
    fake = BlockingModel()
    batcher = Batcher(fake, max_batch=1, max_queue=1, collect_s=0.0)
    body = {"model": "m", "messages": audio_message(b64)}
    results: dict[int, httpx.Response] = {}
    with running(create_app("m", batcher)) as url:
        def ask(i: int) -> None:
            results[i] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        assert fake.started.wait(30)  # the first request is running
        second = threading.Thread(target=ask, args=(1,))
        second.start()
        deadline = time.monotonic() + 30
        while batcher.waiting < 1:  # the second one waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        _error(busy, 503)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "overloaded"
        threading.Timer(0.5, fake.release.set).start()  # released while the server is being stopped
    first.join(30)
    second.join(30)
    assert [results[i].json()["choices"][0]["message"]["content"] for i in (0, 1)] == ["ok", "ok"]


def test_serve_fails_at_start_up_on_a_folder_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path / "empty"), "--port", str(free_port())])
    assert result.exit_code != 0
    assert "empty" in result.output


def test_serve_help_explains_every_option() -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--host", "--port", "--max-batch", "--max-queue", "--max-audio-s", "--voice"):
        assert option in result.output


def test_sse_lines_are_openai_chunks(server, clip) -> None:
    url, _ = server
    _, b64 = clip
    body = {"model": "diva-tiny", "messages": audio_message(b64), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in map(json.loads, events[:-1]):
        assert event["object"] == "chat.completion.chunk" and event["id"].startswith("chatcmpl-")


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]  # fmt: skip


def test_the_web_page_records_the_microphone_and_streams_the_answer(server, model, clip, speech_dir: Path,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """Headless Chromium (Debian's) driven by Playwright: the fake microphone plays a real clip into the page's
    recorder; the answer streams into the DOM in pieces and comes back spoken. Then a file dropped on the page:
    its answer is the API's for the same clip (the page sends 16 kHz 16-bit WAV, exact for a 16-bit clip)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is not installed (make system-deps installs it)"
    url, _ = server
    samples, b64 = clip
    mic = tmp_path / "mic.wav"
    sf.write(mic, np.concatenate([samples, np.zeros(8_000, np.float32)]), 16_000, subtype="PCM_16")
    spoken_file = tmp_path / "question.wav"
    sf.write(spoken_file, samples, 16_000, subtype="PCM_16")
    expected = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "diva-tiny", "messages": audio_message(b64)}).json()["choices"][0]["message"]["content"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={mic}"])  # fmt: skip
        try:
            page = browser.new_context(permissions=["microphone"]).new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent === 'diva-tiny'")
            page.click("#record")
            page.wait_for_selector("#status[data-state=recording]")
            page.wait_for_timeout(2000)
            page.click("#record")
            page.wait_for_selector("#status[data-state=done]", timeout=120_000)
            assert page.inner_text("#error") == ""
            assert page.inner_text("#answer").strip()
            assert int(page.get_attribute("#answer", "data-pieces")) > 1  # streamed, not sent at once
            assert page.get_attribute("#player", "src").startswith("data:audio/wav;base64,")
            page.screenshot(path=str(tmp_path / "serve-page.png"))
            page.evaluate("document.getElementById('status').dataset.state = 'idle'")
            page.set_input_files("#file", str(spoken_file))
            page.wait_for_selector("#status[data-state=done]", timeout=120_000)
            assert page.evaluate("document.getElementById('answer').textContent") == expected
        finally:
            browser.close()


class FailingOnceModel:
    """Raises on its first batch, answers the next: a failed batch is a 500 for its requests, not a dead server."""

    def __init__(self) -> None:
        self.calls = 0

    def prompt_tokens(self, instruction) -> int:
        return 0

    def run(self, jobs) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("out of memory (simulated)")
        for job in jobs:
            job.emit(Done("fine", "stop", 1, 1))


def test_a_failed_batch_is_a_500_and_the_server_goes_on(clip) -> None:
    _, b64 = clip
    body = {"model": "m", "messages": audio_message(b64)}
    with running(create_app("m", Batcher(FailingOnceModel(), collect_s=0.0))) as url:
        failed = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert "out of memory" in _error(failed, 500)["message"]
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"][
            "content"] == "fine"  # fmt: skip
