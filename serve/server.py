"""`diva serve`: load the student, start the batcher, run the app on uvicorn until SIGINT / SIGTERM.

A model folder that does not load fails here, before the port opens. On shutdown uvicorn stops accepting,
lets the open requests finish (up to `graceful_s`), then the batcher drains and stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from diva.errors import UserError
from diva.serve.protocol import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id clients send as `model` (default: the model path as given)
    device: str = "auto"
    max_batch: int = 8  # requests decoded together
    max_queue: int = 32  # requests waiting besides the running batch; beyond: 503
    collect_ms: float = 10.0  # how long the batcher waits after a request for others to join its batch
    voice: str = "slt"  # the spoken answers' voice when a request names none (or an OpenAI voice)
    graceful_s: float = 30.0
    limits: Limits = field(default_factory=Limits)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for tests and benchmarks on loopback)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_app(model_dir: str | Path, options: ServeOptions):
    """The app and its batcher for the student in `model_dir` (UserError when it does not load)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"diva serve needs the serve extra: pip install 'diva-distill[serve]' ({e})") from e
    from diva.serve.app import create_app
    from diva.serve.engine import Batcher, SpeechModel
    from diva.serve.speech import voice_spec

    try:
        model = SpeechModel(model_dir, options.device)
    except FileNotFoundError as e:
        raise UserError(f"cannot load the model {model_dir}: {e}") from e
    try:
        voice_spec(options.voice)
    except UserError as e:
        log.warning("spoken answers will fail: %s", e)
    batcher = Batcher(model, options.max_batch, options.max_queue, options.collect_ms / 1000)
    app = create_app(options.model_name or str(model_dir), batcher, options.limits, options.voice)
    return app, batcher


def serve(model_dir: str | Path, options: ServeOptions) -> None:
    """Serve until interrupted (see the module docstring)."""
    import uvicorn

    app, _ = build_app(model_dir, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                            timeout_graceful_shutdown=options.graceful_s)  # fmt: skip
    uvicorn.Server(config).run()
