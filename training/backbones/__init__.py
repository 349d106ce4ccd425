"""Backbone registry (timm-style): ``create_backbone("iresnet50")``, ``create_backbone("onnx:model.onnx")``."""

from __future__ import annotations

from collections.abc import Callable

from crfiqa.training.backbones.base import QualityNet, QualityOutput

_REGISTRY: dict[str, Callable[..., QualityNet]] = {}


def register_backbone(fn: Callable[..., QualityNet]) -> Callable[..., QualityNet]:
    """Decorator: register a factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Registered names (plus the ``onnx:<path>`` form)."""
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> QualityNet:
    """Build a registered backbone, or import an ONNX recognition model with ``onnx:<path>``."""
    if name.startswith("onnx:"):
        from crfiqa.training.backbones.onnx_import import OnnxBackbone

        return OnnxBackbone(name[len("onnx:"):], **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}, onnx:<path>")
    return _REGISTRY[name](**kwargs)


from crfiqa.training.backbones import iresnet, mobilefacenet  # noqa: E402,F401  (registers the factories)

__all__ = ["QualityNet", "QualityOutput", "create_backbone", "list_backbones", "register_backbone"]
