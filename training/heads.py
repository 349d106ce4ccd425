"""Quality heads ``qs``: the paper's linear unit on the embedding, and one that also sees the embedding's norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUALITY_HEADS = ("linear", "norm")


class NormAwareHead(nn.Module):
    """``qs = w . e/|e| + a . log|e| + b``: the paper's linear unit on the raw embedding cannot express the
    norm (a strong quality signal of margin-trained recognisers), so this one is given it explicitly."""

    def __init__(self, embedding_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embedding_size + 1, 1)

    @staticmethod
    def features(embedding: torch.Tensor) -> torch.Tensor:
        """[unit embedding, log norm]: what the linear layer sees."""
        norm = embedding.float().norm(dim=1, keepdim=True).clamp_min(1e-6)
        return torch.cat([F.normalize(embedding.float()), norm.log()], dim=1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(embedding))


def build_quality_head(kind: str, embedding_size: int) -> nn.Module:
    """A fresh ``qs`` of the given kind."""
    if kind == "linear":
        return nn.Linear(embedding_size, 1)
    if kind == "norm":
        return NormAwareHead(embedding_size)
    raise ValueError(f"quality_head must be one of {QUALITY_HEADS}, not {kind!r}")


def head_features(head: nn.Module, embedding: torch.Tensor) -> torch.Tensor:
    """The inputs of the head's final linear layer (for a closed-form initialisation)."""
    return head.features(embedding) if isinstance(head, NormAwareHead) else embedding.float()


def head_linear(head: nn.Module) -> nn.Linear:
    """The head's final linear layer."""
    return head.linear if isinstance(head, NormAwareHead) else head


@torch.no_grad()
def ridge_init(head: nn.Module, embeddings: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> float:
    """Set the head to the ridge regression of ``targets`` on its features (features standardised for the
    penalty, intercept free); returns the fit's RMSE. Training then starts from the best linear fit."""
    x = head_features(head, embeddings).double()
    y = targets.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mu) / sd
    gram = z.T @ z + alpha * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(gram, z.T @ (y - y.mean()))
    weight = w / sd
    bias = y.mean() - (mu * weight).sum()
    lin = head_linear(head)
    lin.weight.copy_(weight[None].to(lin.weight.dtype))
    lin.bias.fill_(float(bias))
    return float(((x @ weight + bias - y) ** 2).mean().sqrt())
