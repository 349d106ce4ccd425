"""Offline optimisation of an exported ONNX model, parity-checked against the file it came from.

Three rewrites, then onnxslim (constant folding, dead-node elimination, shape inference):
- ``GreaterOrEqual(x, 0) -> Where(., x, Mul(x, slope))`` becomes one ``PRelu(x, slope)``: the form older
  exports of the ONNX importer produced, 2.7x slower in ONNX Runtime than the fused operator;
- a ``BatchNormalization`` right after a ``Conv`` or ``Gemm`` (the only reader of its output) is folded into
  that node's weights and bias;
- what is left unused is dropped.
Only standard ONNX operators come out (no ORT-specific fused kernels, which its offline "extended/all" levels
would write and which tie a file to the execution provider it was optimised on), so one file serves the CPU
and the CUDA providers; ONNX Runtime still applies its own fusions when it loads the file.
Torch-free: ``crfiqa export`` runs it last, and it re-optimises an existing export (``crfiqa export X.onnx``).
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OptimiseReport:
    """What ``optimise_onnx`` did: node counts before/after, rewrites applied, worst output difference."""

    nodes_before: int
    nodes_after: int
    prelu_rewritten: int
    batchnorm_folded: int
    parity: float

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return dict(self.__dict__)


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Operator histogram of a model's main graph."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return dict(collections.Counter(n.op_type for n in model.graph.node))


class _Graph:
    """Look-ups over a graph under rewrite: constants by name, producer and readers of each value."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.refresh()

    def refresh(self) -> None:
        """Recompute producers and readers after nodes changed."""
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.readers[i].append(n)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def private(self, name: str) -> bool:
        """Whether ``name`` feeds exactly one node and is not a graph output (so its producer may change)."""
        return len(self.readers[name]) == 1 and name not in self.outputs

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        """A new, uniquely named initializer."""
        while name in self.initializers:
            name += "_"
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name


def _where_prelu(g: _Graph) -> int:
    """Replace ``Where(x >= 0, x, x * slope)`` (slope constant) by ``PRelu(x, slope)``; returns the count."""
    replaced = 0
    for where in [n for n in g.graph.node if n.op_type == "Where"]:
        cond, x, neg = where.input
        ge, mul = g.producer.get(cond), g.producer.get(neg)
        if ge is None or mul is None or ge.op_type != "GreaterOrEqual" or mul.op_type != "Mul":
            continue
        zero = g.constant(ge.input[1])
        if ge.input[0] != x or zero is None or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
            continue
        others = [i for i in mul.input if i != x]
        if len(others) != 1 or g.constant(others[0]) is None or not (g.private(cond) and g.private(neg)):
            continue
        idx = list(g.graph.node).index(where)
        g.graph.node.insert(idx, helper.make_node("PRelu", [x, others[0]], list(where.output),
                                                  name=(where.name or "where") + "_prelu"))
        for dead in (where, ge, mul):
            g.graph.node.remove(dead)
        g.refresh()
        replaced += 1
    return replaced


def _fold_batchnorm(g: _Graph) -> int:
    """Fold inference ``BatchNormalization`` into the ``Conv``/``Gemm`` before it; returns the count."""
    folded = 0
    for bn in [n for n in g.graph.node if n.op_type == "BatchNormalization"]:
        prev = g.producer.get(bn.input[0])
        if prev is None or prev.op_type not in ("Conv", "Gemm") or len(bn.output) != 1 or not g.private(bn.input[0]):
            continue
        params = [g.constant(i) for i in bn.input[1:5]]
        weight = g.constant(prev.input[1])
        bias = g.constant(prev.input[2]) if len(prev.input) > 2 and prev.input[2] else None
        if weight is None or any(p is None for p in params) or (len(prev.input) > 2 and prev.input[2] and bias is None):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in prev.attribute}
        if prev.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0 or weight.ndim != 2):
            continue
        eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
        scale = gamma / np.sqrt(var + eps)
        w = weight.astype(np.float64)
        if prev.op_type == "Conv":
            w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        elif attrs.get("transB", 0):  # Gemm weight [out, in]
            w = w * scale[:, None]
        else:  # Gemm weight [in, out]
            w = w * scale[None, :]
        b = np.zeros_like(scale) if bias is None else bias.astype(np.float64).reshape(-1)
        b = (b - mean) * scale + beta
        base = prev.name or prev.output[0]
        w_name = g.add_initializer(w.astype(weight.dtype), f"{base}.bn_folded.weight")
        b_name = g.add_initializer(b.astype(weight.dtype), f"{base}.bn_folded.bias")
        data = prev.input[0]
        del prev.input[:]
        prev.input.extend([data, w_name, b_name])
        prev.output[0] = bn.output[0]  # the folded node now writes what the BatchNorm wrote
        g.graph.node.remove(bn)
        g.refresh()
        folded += 1
    return folded


def _drop_unused(g: _Graph) -> None:
    """Remove nodes and initializers that no graph output depends on."""
    needed = set(g.outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(g.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del g.graph.node[:]
    g.graph.node.extend(reversed(keep))
    unused = [t for t in g.graph.initializer if t.name not in needed]
    for t in unused:
        g.graph.initializer.remove(t)
    g.initializers = {t.name: t for t in g.graph.initializer}
    g.refresh()


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, int]:
    """The three rewrites on a copy of ``model``: (model, PRelu rewrites, BatchNorms folded)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out.graph)
    prelu = _where_prelu(g)
    folded = _fold_batchnorm(g)
    _drop_unused(g)
    del out.graph.value_info[:]  # stale after the rewrites; onnxslim infers them again
    return out, prelu, folded


def probe_inputs(model: onnx.ModelProto, extra: list[np.ndarray] | None = None, seed: int = 0) -> list[np.ndarray]:
    """Random inputs in [-1, 1] of the model's (single) input shape, batch 4 where it is free, plus ``extra``."""
    inp = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 0 for d in inp.type.tensor_type.shape.dim]
    shape = [dims[0] or 4] + [d or 112 for d in dims[1:]]
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, shape).astype(np.float32), *(extra or [])]


def max_difference(a: str | Path, b: str | Path, inputs: list[np.ndarray]) -> float:
    """Largest |a - b| over every output and input batch, relative to max(1, |a|) per output."""
    import onnxruntime as ort

    def session(path: str | Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sa, sb = session(a), session(b)
    names = [o.name for o in sa.get_outputs()]
    if sorted(names) != sorted(o.name for o in sb.get_outputs()):
        raise ValueError(f"{b} has outputs {[o.name for o in sb.get_outputs()]}, {a} has {names}")
    worst = 0.0
    for x in inputs:
        ra = sa.run(names, {sa.get_inputs()[0].name: x})
        rb = sb.run(names, {sb.get_inputs()[0].name: x})
        for u, v in zip(ra, rb):
            worst = max(worst, float(np.abs(u - v).max() / max(1.0, float(np.abs(u).max()))))
    return worst


def optimise_onnx(src: str | Path, dst: str | Path, inputs: list[np.ndarray] | None = None,
                  tolerance: float = PARITY_TOLERANCE) -> OptimiseReport:
    """Write the optimised ``src`` to ``dst`` (may be the same path), after checking that every output stays
    within ``tolerance`` of ``src`` on random inputs and ``inputs`` (e.g. real aligned faces); else ValueError."""
    import onnxslim

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    before = len(model.graph.node)
    rewritten, prelu, folded = rewrite(model)
    slim = onnxslim.slim(rewritten)
    onnx.checker.check_model(slim)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / dst.name
        onnx.save(slim, str(candidate))
        diff = max_difference(src, candidate, probe_inputs(model, inputs))
        if diff > tolerance:
            raise ValueError(f"optimised {src.name} differs from the original by {diff:.2e}, over {tolerance}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(candidate, dst)
    return OptimiseReport(before, len(slim.graph.node), prelu, folded, diff)


def to_float16(src: str | Path, dst: str | Path) -> Path:
    """A float16 copy of ``src`` for GPUs (onnxconverter-common; the input and outputs stay float32, so callers
    feed and read the same arrays). Check its scores before use: fp16 is not exact."""
    import warnings

    from onnxconverter_common import float16

    model = onnx.load(str(src))
    _detach_read_outputs(model.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "float32 number ... will be truncated": tiny weights
        model = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)


def _detach_read_outputs(graph: onnx.GraphProto) -> None:
    """Graph outputs that nodes also read (the embedding, read by ``qs``) get an Identity of their own: the
    fp16 converter's float32 output cast would otherwise also feed the float16 readers (a type error)."""
    readers = {i for n in graph.node for i in n.input}
    for output in graph.output:
        if output.name not in readers:
            continue
        inner = output.name + "_value"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [output.name], name=output.name + "_output"))
