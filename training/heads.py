"""Quality heads ``qs``: the paper's linear unit on the embedding, one that also sees the embedding's norm, and
one that sees the norm and statistics of the backbone's intermediate feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

QUALITY_HEADS = ("linear", "norm", "feature_stats")


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


class FeatureStatsHead(nn.Module):
    """``qs = w . [e/|e|, log|e|, mean_hw(F), std_hw(F) for each tapped feature map F] + b``.

    The embedding is trained to be invariant to what degrades a face; the feature maps before it are not: the
    per-channel mean and spread of their activations say how much texture, contrast and structure the network
    found (blur, low contrast, warps and colour casts move them), which the embedding and its norm summarise
    away. Fitted in closed form (``training/closed_form.py``) on a frozen backbone."""

    def __init__(self, embedding_size: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        self.linear = nn.Linear(embedding_size + 1 + 2 * sum(self.channels), 1)

    @staticmethod
    def features(embedding: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """[unit embedding, log norm, then per map: channel means, channel standard deviations (population)]."""
        stats = [NormAwareHead.features(embedding)]
        for m in maps:
            m = m.float()
            mean = m.mean(dim=(2, 3), keepdim=True)
            stats += [mean.flatten(1), (m - mean).square().mean(dim=(2, 3)).sqrt()]
        return torch.cat(stats, dim=1)

    def forward(self, embedding: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.linear(self.features(embedding, maps))


def build_quality_head(kind: str, embedding_size: int, channels: Sequence[int] = ()) -> nn.Module:
    """A fresh ``qs`` of the given kind (``feature_stats``: ``channels`` of the tapped maps)."""
    if kind == "linear":
        return nn.Linear(embedding_size, 1)
    if kind == "norm":
        return NormAwareHead(embedding_size)
    if kind == "feature_stats":
        if not channels:
            raise ValueError("a feature_stats head needs the channel counts of its tapped feature maps")
        return FeatureStatsHead(embedding_size, channels)
    raise ValueError(f"quality_head must be one of {QUALITY_HEADS}, not {kind!r}")


def head_features(head: nn.Module, embedding: torch.Tensor) -> torch.Tensor:
    """The inputs of the head's final linear layer (for a closed-form initialisation)."""
    return head.features(embedding) if isinstance(head, NormAwareHead) else embedding.float()


def head_linear(head: nn.Module) -> nn.Linear:
    """The head's final linear layer."""
    return head.linear if isinstance(head, (NormAwareHead, FeatureStatsHead)) else head


@torch.no_grad()
def ridge_init(head: nn.Module, embeddings: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0) -> float:
    """Set the head to the ridge regression of ``targets`` on its features; returns the fit's RMSE. Training
    then starts from the best linear fit."""
    return ridge_fit(head_linear(head), head_features(head, embeddings), targets, alpha)


@torch.no_grad()
def ridge_fit(lin: nn.Linear, features: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0,
              weights: torch.Tensor | None = None) -> float:
    """Set ``lin`` to the (row-``weights``ed) ridge regression of ``targets`` on ``features`` (standardised for
    the penalty, intercept free, folded back into the raw-feature weights); returns the fit's weighted RMSE."""
    x = features.double()
    y = targets.double()
    # An integer weight is that many copies of the row: the weighted mean, (unbiased) spread and Gram matrix
    # equal the duplicated set's, so alpha means the same with or without weights.
    w = torch.ones(len(x), dtype=x.dtype) if weights is None else weights.double()
    total = w.sum()
    mu = (w @ x) / total
    y_mu = (w @ y) / total
    sd = ((w @ (x - mu) ** 2) / (total - 1)).sqrt()
    # A (nearly) constant column carries no signal: infinite scale gives it weight 0 instead of a huge raw
    # weight that the bias must cancel.
    sd = torch.where(sd > 1e-6 * sd.max().clamp_min(1e-12), sd, torch.full_like(sd, torch.inf))
    z = (x - mu) / sd
    gram = z.T @ (w[:, None] * z) + alpha * torch.eye(z.shape[1], dtype=z.dtype)
    coef = torch.linalg.solve(gram, z.T @ (w * (y - y_mu)))
    weight = coef / sd
    bias = y_mu - (mu * weight).sum()
    lin.weight.copy_(weight[None].to(lin.weight.dtype))
    lin.bias.fill_(float(bias))
    return float(((w @ (x @ weight + bias - y) ** 2) / total).sqrt())
