"""``crfiqa serve``: run the FastAPI app under uvicorn, one worker per process (scale with replicas)."""

from __future__ import annotations

import argparse
import logging
import sys

FLAGS = {  # flag -> (setting, type, help); every flag overrides its CRFIQA_* variable
    "--host": ("host", str, "address to bind (CRFIQA_HOST, default 127.0.0.1)"),
    "--port": ("port", int, "port (CRFIQA_PORT, default 8000)"),
    "--models-dir": ("models_dir", str, "model directory (CRFIQA_MODELS_DIR)"),
    "--detector": ("detector", str, "detector name (CRFIQA_DETECTOR)"),
    "--quality-model": ("quality_model", str, "quality model name or .onnx path (CRFIQA_QUALITY_MODEL)"),
    "--providers": ("providers", str, "ONNX Runtime providers, comma-separated (CRFIQA_PROVIDERS)"),
    "--max-batch-size": ("max_batch_size", int, "faces per quality inference (CRFIQA_MAX_BATCH_SIZE)"),
    "--max-queue-delay-ms": ("max_queue_delay_ms", float, "batch fill wait (CRFIQA_MAX_QUEUE_DELAY_MS)"),
    "--worker-threads": ("worker_threads", int, "decode/detect threads (CRFIQA_WORKER_THREADS)"),
    "--log-level": ("log_level", str, "log level (CRFIQA_LOG_LEVEL)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the serve flags."""
    for flag, (dest, typ, text) in FLAGS.items():
        p.add_argument(flag, dest=f"serve_{dest}", type=typ, default=None, help=text)


def main(args: argparse.Namespace) -> int:
    """Validate settings, then serve until SIGINT/SIGTERM (which drain in-flight requests)."""
    import uvicorn
    from pydantic import ValidationError

    from crfiqa.service.api import logs
    from crfiqa.service.api.app import create_app
    from crfiqa.service.api.protocol import timed_protocol
    from crfiqa.service.settings import Settings

    overrides = {dest: getattr(args, f"serve_{dest}") for _, (dest, _, _) in FLAGS.items()
                 if getattr(args, f"serve_{dest}", None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"crfiqa serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    # The in-flight limit is the app's (503 + Retry-After, probes exempt), not uvicorn's limit_concurrency
    # (a bare 503 that also counts idle keep-alive connections); slow clients meet the header timeout.
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=settings.graceful_timeout_s,
                            server_header=False, http=timed_protocol(settings.header_timeout_s),
                            timeout_keep_alive=settings.keep_alive_s)
    server = uvicorn.Server(config)
    server.run()
    # uvicorn exits the process itself when lifespan start-up fails (e.g. a missing model); a clean
    # stop returns here.
    logging.getLogger("crfiqa.api").info("server exited")
    return 0 if server.started else 3
