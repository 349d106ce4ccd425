"""ONNX Runtime sessions: provider selection with fallback, thread settings, one place for both."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


_warned: set[tuple[str, ...]] = set()


def select_providers(requested: Sequence[str] = DEFAULT_PROVIDERS) -> list[str]:
    """Keep the requested providers this ONNX Runtime build has, in order; warn (once) about the others."""
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    missing = tuple(p for p in requested if p not in available)
    if missing and missing not in _warned:
        _warned.add(missing)
        # Typical cause: both onnxruntime and onnxruntime-gpu installed, so the CPU build shadows CUDA.
        log.warning("execution providers not available here, falling back: %s (available: %s)",
                    ", ".join(missing), ", ".join(sorted(available)))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def create_session(
    path: str | Path, providers: Sequence[str] = DEFAULT_PROVIDERS, intra_op_threads: int = 0
) -> ort.InferenceSession:
    """Open an ONNX model with the best available providers; ``session.get_providers()[0]`` is the one in use."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # SFace's "initializer in graph inputs" warnings are harmless noise
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    provider_list: list = []
    for name in select_providers(providers):
        if name == "CUDAExecutionProvider":
            # The CUDA arena grows to the largest batch seen and never shrinks: grow it only as needed.
            provider_list.append((name, {"arena_extend_strategy": "kSameAsRequested"}))
        else:
            provider_list.append(name)
    return ort.InferenceSession(str(path), sess_options=options, providers=provider_list)


def provider_in_use(session: ort.InferenceSession) -> str:
    """The execution provider that runs the graph (the first one the session accepted)."""
    return session.get_providers()[0]
