"""Import an ONNX recognition model into torch as a trainable backbone.

A small interpreter for the operators of insightface's w600k_mbf export (Conv with folded BatchNorm,
PRelu, Add, Flatten, Gemm, BatchNormalization): each becomes a torch module holding the ONNX weights,
run in the graph's (topological) node order. Written here because onnx2torch needs torchvision, which
does not install beside the CPU torch build.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from crfiqa.training.backbones.base import QualityNet, QualityOutput

SUPPORTED = ("Conv", "PRelu", "Add", "Flatten", "Gemm", "BatchNormalization")


class _AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dim 1 for inputs of any rank (ONNX BatchNormalization)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Flatten(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, self.axis)


class _PReLU(nn.PReLU):
    """``nn.PReLU`` from ONNX's per-channel slope ([C,1,...,1], [C] or [1]): exports back as one ``PRelu``.

    Checkpoints saved before the importer built ``nn.PReLU`` hold the ONNX-shaped slope [C,1,1]; it is
    reshaped on load (same values, same order).
    """

    def __init__(self, slope: torch.Tensor) -> None:
        if any(d != 1 for d in slope.shape[1:]):
            raise ValueError(f"PRelu slope of shape {list(slope.shape)} is not per-channel")
        super().__init__(num_parameters=slope.numel())
        # A 1-D slope of C > 1 broadcasts over ONNX's last axis: the channel axis only for 2-D inputs.
        self.channel_last_1d = slope.dim() == 1 and slope.numel() > 1
        self.weight.data.copy_(slope.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last_1d and x.dim() != 2:
            raise ValueError(f"PRelu slope [C] on a {x.dim()}-D input: per-last-axis slopes are not supported")
        return super().forward(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].shape != self.weight.shape \
                and state_dict[key].numel() == self.weight.numel():
            state_dict[key] = state_dict[key].reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _module(node: onnx.NodeProto, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The torch module for one ONNX node, holding its weights."""
    a = _attrs(node)
    op = node.op_type
    if op == "Conv":
        w = weights[node.input[1]]
        pads = a.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            raise ValueError(f"asymmetric padding {pads} in {node.name}")
        conv = nn.Conv2d(w.shape[1] * a.get("group", 1), w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", [1, 1])),
                         padding=tuple(pads[:2]), dilation=tuple(a.get("dilations", [1, 1])), groups=a.get("group", 1),
                         bias=len(node.input) > 2)
        conv.weight.data.copy_(w)
        if len(node.input) > 2:
            conv.bias.data.copy_(weights[node.input[2]])
        return conv
    if op == "PRelu":
        return _PReLU(weights[node.input[1]].clone())
    if op == "Add":
        return _Add()
    if op == "Flatten":
        return _Flatten(a.get("axis", 1))
    if op == "Gemm":
        w, b = weights[node.input[1]], weights[node.input[2]] if len(node.input) > 2 else None
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise ValueError(f"unsupported Gemm attributes {a} in {node.name}")
        if not a.get("transB", 0):
            w = w.t()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        linear.weight.data.copy_(w)
        if b is not None:
            linear.bias.data.copy_(b)
        return linear
    if op == "BatchNormalization":
        scale, bias, mean, var = (weights[n] for n in node.input[1:5])
        bn = _AnyRankBatchNorm(scale.numel(), eps=a.get("epsilon", 1e-5), momentum=1 - a.get("momentum", 0.9))
        bn.weight.data.copy_(scale)
        bn.bias.data.copy_(bias)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        return bn
    raise ValueError(f"operator {op} is not supported by the importer (supported: {', '.join(SUPPORTED)})")


class OnnxGraph(nn.Module):
    """An ONNX graph of supported operators as a torch module (trainable, exportable)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        model = onnx.load(str(path))
        graph = model.graph
        weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).float() for t in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in weights)
        self.output_name = graph.output[0].name
        self.steps: list[tuple[str, list[str], str]] = []
        self.nodes = nn.ModuleList()
        for node in graph.node:
            self.nodes.append(_module(node, weights))
            data_inputs = [i for i in node.input if i not in weights]
            self.steps.append((node.op_type, data_inputs, node.output[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every node in order and return the graph output."""
        return self.run(x, ())[0]

    def run(self, x: torch.Tensor, taps: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The graph output and the intermediate tensors named ``taps``."""
        env = {self.input_name: x}
        for module, (_, inputs, output) in zip(self.nodes, self.steps):
            env[output] = module(*(env[i] for i in inputs))
        missing = [t for t in taps if t not in env]
        if missing:
            raise ValueError(f"no tensors {missing} in the graph")
        return env[self.output_name], [env[t] for t in taps]


class OnnxBackbone(QualityNet):
    """An imported ONNX recognition model (its output = the embedding) plus the ``qs`` head."""

    def __init__(self, path: str | Path, embedding_size: int | None = None) -> None:
        graph = OnnxGraph(path).eval()  # eval: the shape probe must not touch BatchNorm statistics
        with torch.no_grad():
            dim = graph(torch.zeros(1, 3, 112, 112)).shape[1]
        if embedding_size is not None and embedding_size != dim:
            raise ValueError(f"{path} gives {dim}-d embeddings, not {embedding_size}")
        super().__init__(dim)
        self.graph = graph
        self.source = str(path)
        self.taps: tuple[str, ...] = ()  # intermediate tensors the quality head reads (a FeatureStatsHead)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The imported network's output."""
        return self.graph(x)

    def forward(self, x: torch.Tensor) -> QualityOutput:
        """Embedding and quality; a head on tapped feature maps gets them from the same pass."""
        if not self.taps:
            return super().forward(x)
        embedding, maps = self.graph.run(x, self.taps)
        return QualityOutput(embedding, self.qs(embedding, maps))

    @torch.no_grad()
    def tap_channels(self, taps: Sequence[str]) -> list[int]:
        """Channel counts of the named intermediate tensors (a shape probe in eval mode)."""
        was_training = self.training
        self.eval()
        _, maps = self.graph.run(torch.zeros(1, 3, 112, 112), taps)
        self.train(was_training)
        return [m.shape[1] for m in maps]

    def freeze_prefix(self, fraction: float) -> None:
        """Freeze the first ``fraction`` of the graph's nodes (the early blocks): fewer gradients to compute."""
        self.frozen = int(len(self.graph.nodes) * fraction)
        for module in list(self.graph.nodes)[: self.frozen]:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> OnnxBackbone:
        """Train mode everywhere but the frozen prefix, whose BatchNorm statistics stay fixed."""
        super().train(mode)
        for module in list(self.graph.nodes)[: getattr(self, "frozen", 0)]:
            module.eval()
        return self


def check_supported(path: str | Path) -> list[str]:
    """Operators of ``path`` the importer does not support (empty = importable)."""
    return sorted({n.op_type for n in onnx.load(str(path)).graph.node} - set(SUPPORTED))


__all__ = ["OnnxBackbone", "OnnxGraph", "check_supported"]
