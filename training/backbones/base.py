"""The backbone API: ``forward_features`` (embedding) and ``forward_head`` (quality), as a named tuple."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class QualityOutput(NamedTuple):
    """What every backbone returns: the recognition embedding and the predicted quality (CR)."""

    embedding: torch.Tensor  # [N, D]
    quality: torch.Tensor  # [N, 1]


class QualityNet(nn.Module):
    """A recognition network with the CR-FIQA quality unit ``qs = Linear(D -> 1)`` on its embedding."""

    embedding_size: int = 512

    def __init__(self, embedding_size: int = 512) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.qs = nn.Linear(embedding_size, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (before L2 normalisation)."""
        raise NotImplementedError

    def forward_head(self, embedding: torch.Tensor) -> torch.Tensor:
        """Predicted quality [N, 1] from the embedding."""
        return self.qs(embedding)

    def forward(self, x: torch.Tensor) -> QualityOutput:
        """Embedding and quality for a normalised RGB NCHW batch."""
        embedding = self.forward_features(x)
        return QualityOutput(embedding, self.forward_head(embedding))

    def feature_parameters(self) -> list[nn.Parameter]:
        """Parameters of the recognition part (everything but ``qs``)."""
        return [p for n, p in self.named_parameters() if not n.startswith("qs.")]
