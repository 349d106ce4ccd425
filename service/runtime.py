"""ONNX Runtime sessions: provider selection, thread settings, one place for both.

ONNX Runtime is imported here only, on first use, so an install without it (neither ``crfiqa[cpu]`` nor
``crfiqa[gpu]``) gets one clear sentence instead of a traceback from deep inside an import chain.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from crfiqa.service.errors import ModelError

log = logging.getLogger(__name__)

#: The order "best available" means: CUDA when this ONNX Runtime build has it, else the CPU.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: Providers that run on a GPU (batching pays there; on a CPU, calls side by side already fill the cores).
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")
#: The default of every ``providers`` setting: empty = the best available, chosen silently.
DEFAULT_PROVIDERS: tuple[str, ...] = ()

_warned: set[tuple[str, ...]] = set()


def onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or a ``ModelError`` saying which extra to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("ONNX Runtime is not installed: install crfiqa[cpu] or crfiqa[gpu]",
                         code="runtime_missing") from exc
    return ort


def select_providers(requested: Sequence[str] = DEFAULT_PROVIDERS) -> list[str]:
    """The providers to use, in order. Nothing requested: the best this build has, silently. Requested
    explicitly: those this build has, with one warning naming the missing ones."""
    available = set(onnxruntime().get_available_providers())
    if not requested:
        return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    chosen = [p for p in requested if p in available]
    missing = tuple(p for p in requested if p not in available)
    if missing and missing not in _warned:
        _warned.add(missing)
        # Typical cause: both onnxruntime and onnxruntime-gpu installed, so the CPU build shadows CUDA.
        log.warning("requested execution providers not available here, falling back: %s (available: %s)",
                    ", ".join(missing), ", ".join(sorted(available)))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def create_session(path: str | Path, providers: Sequence[str] = DEFAULT_PROVIDERS, intra_op_threads: int = 0,
                   solo_threads: int = 0, cpu_rewrite: bool = True) -> Any:
    """Open an ONNX model with the selected providers; ``session.get_providers()[0]`` is the one in use.

    ``solo_threads`` > ``intra_op_threads`` (not 0, which already means every core) on the CPU: a
    ``SoloSession`` (a lone call on ``solo_threads``, the others on ``intra_op_threads``). On the CPU the graph
    runs through ``prelu_as_max`` first (the same values, faster); ``cpu_rewrite=False`` opens the file as is."""
    source: str | bytes = str(path)
    if cpu_rewrite and select_providers(providers)[0] == "CPUExecutionProvider":
        source = prelu_as_max(path) or source
    session = _session(source, path, providers, intra_op_threads, spin=False)
    if 0 < intra_op_threads < solo_threads and provider_in_use(session) == "CPUExecutionProvider":
        return SoloSession(session, _session(source, path, providers, solo_threads, spin=True))
    return session


def prelu_as_max(path: str | Path) -> bytes | None:
    """The model with each PRelu whose slopes are constants <= 1 written as ``Max(x, x * slope)``, serialised;
    None when it has none (or is not a self-contained ONNX file: ONNX Runtime then reports on it).

    Equal bit for bit: with slope <= 1, x >= slope * x for x >= 0 and slope * x >= x for x < 0, and the product
    is the one PRelu computes. Why: ONNX Runtime's CPU PRelu kernel took 36 % of crfiqa_mbf's time (its 34
    PRelu against 49 convolutions) and the rewrite runs MobileFaceNet 1.2-1.45x faster
    (benchmarks/export_speed.py); the CUDA provider's PRelu is fast, so GPU sessions open the file as is."""
    import onnx
    from onnx import helper, numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX: opening it with ONNX Runtime gives the typed bad_model
        return None
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        return None
    constants = {t.name: t for t in graph.initializer}
    nodes, changed = [], False
    for node in graph.node:
        tensor = constants.get(node.input[1]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        slope = numpy_helper.to_array(tensor) if tensor is not None else None  # only slopes, not every weight
        if slope is None or not slope.size or not bool((slope <= 1).all()):
            nodes.append(node)
            continue
        scaled = f"{node.output[0]}__crfiqa_prelu_scaled"
        nodes += [helper.make_node("Mul", [node.input[0], node.input[1]], [scaled], name=f"{scaled}_mul"),
                  helper.make_node("Max", [node.input[0], scaled], [node.output[0]], name=f"{scaled}_max")]
        changed = True
    if not changed:
        return None
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


def _session(source: str | bytes, path: str | Path, providers: Sequence[str], intra_op_threads: int,
             spin: bool) -> Any:
    """One ORT session of the model at ``path`` (``source``: the path, or the model rewritten); ``spin``: its
    intra-op threads spin while a call runs and stop when it returns."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # SFace's "initializer in graph inputs" warnings are harmless noise
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # Idle intra-op threads sleep instead of spinning: the pipeline's stages (detection in worker threads,
    # quality inference) run sessions at once, and a spinning pool burns the cores the other stage needs
    # (measured on 2 cores: 2 threads with spinning cost 1.25-1.8x the CPU per face of 1 thread; without, 1.0-1.1x).
    # A solo session runs alone, so it spins during its call (2 threads: 12.6 ms per face against 13.5 without
    # spinning and 18 with 1 thread) and stops at once after it, leaving the cores to what comes next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    provider_list: list = []
    for name in select_providers(providers):
        if name == "CUDAExecutionProvider":
            # The CUDA arena grows to the largest batch seen and never shrinks: grow it only as needed.
            provider_list.append((name, {"arena_extend_strategy": "kSameAsRequested"}))
        else:
            provider_list.append(name)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=provider_list)
    except Exception as exc:  # ORT's own untyped errors (InvalidProtobuf, Fail, ...): not an ONNX model it can run
        raise ModelError(f"{path}: ONNX Runtime cannot load this model: {exc}", code="bad_model") from exc


class _Activity:
    """What runs now in this process: SoloSession calls, and the images callers declared in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.images = 0

    def enter(self, session: SoloSession) -> bool:
        """Count a call of ``session`` in; True when it runs alone: no other call, at most one image in flight."""
        with self.lock:  # the session's counters too: calls come from many threads
            self.calls += 1
            alone = self.calls == 1 and self.images <= 1
            if alone:
                session.solo_calls += 1
            else:
                session.shared_calls += 1
            return alone

    def leave(self) -> None:
        """Count a call out."""
        with self.lock:
            self.calls -= 1

    def hold(self, n: int) -> None:
        """Count ``n`` images in (negative: out)."""
        with self.lock:
            self.images += n


_ACTIVITY = _Activity()


@contextmanager
def images_in_flight(n: int) -> Iterator[None]:
    """Declare ``n`` images in work meanwhile (a service request, a ``Pipeline.run``): with more than one, no
    call takes a solo session even in a gap between calls, since the other images' calls are about to come."""
    _ACTIVITY.hold(n)
    try:
        yield
    finally:
        _ACTIVITY.hold(-n)


class SoloSession:
    """Two sessions of one model on the CPU: a call that starts while no other model call runs (and at most
    one image is declared in flight, ``images_in_flight``) takes the many-thread ``solo`` session, any other
    the few-thread ``shared`` one.

    Why: throughput under load comes from calls side by side on one thread each (pipeline.py), but a lone
    request (one client, sequential requests) then leaves the other cores idle; ORT fixes a session's thread
    count at creation, so the two regimes need two sessions (memory: one more copy of the weights)."""

    def __init__(self, shared: Any, solo: Any) -> None:
        self.shared = shared
        self.solo = solo
        self.solo_calls = 0  # how many calls each session took (tests, benchmarks)
        self.shared_calls = 0

    def run(self, output_names: Any, input_feed: dict, run_options: Any = None) -> list:
        """``InferenceSession.run`` on the session this moment calls for."""
        alone = _ACTIVITY.enter(self)
        try:
            return (self.solo if alone else self.shared).run(output_names, input_feed, run_options)
        finally:
            _ACTIVITY.leave()

    def __getattr__(self, name: str) -> Any:
        # Inputs, outputs, providers and metadata are the shared session's (both open the same file).
        return getattr(self.shared, name)


def provider_in_use(session: Any) -> str:
    """The execution provider that runs the graph (the first one the session accepted)."""
    return session.get_providers()[0]
