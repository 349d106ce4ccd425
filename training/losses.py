"""ArcFace head, the certainty-ratio targets and the combined CR-FIQA loss (paper §3, Eq. 1-6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CR_TARGETS = ("paper", "official", "ccs")
CR_CENTRES = ("head", "loo")
EPSILON = 1e-9
#: The released code's stand-in for the own-class cosine before taking NNCCS (see upstream notes).
OFFICIAL_OWN_CLASS_FILL = -1e-12


class ArcFaceHead(nn.Module):
    """Class centres W and the additive angular margin: logits s*cos(theta_y + m) and s*cos(theta_j)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("ArcFace needs at least 2 classes (NNCCS is a max over the other classes)")
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta) between normalised embeddings and normalised centres, clamped to [-1, 1]."""
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1.0, 1.0)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits with the margin on the target class, the cosines before the margin, detached)."""
        cos = self.cosines(embeddings)
        before_margin = cos.detach().clone()  # CCS/NNCCS are read here, before any margin is applied
        target = cos.gather(1, labels[:, None])
        with_margin = torch.cos(torch.acos(target.clamp(-1 + 1e-7, 1 - 1e-7)) + self.m)
        logits = cos.scatter(1, labels[:, None], with_margin) * self.s
        return logits, before_margin


def class_centre_similarities(cos: torch.Tensor, labels: torch.Tensor, own_fill: float = float("-inf")
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CCS, NNCCS): the cosine to the own centre, and the largest cosine to any other centre."""
    ccs = cos.gather(1, labels[:, None]).squeeze(1)
    nnccs = cos.scatter(1, labels[:, None], own_fill).max(dim=1).values
    return ccs, nnccs


@torch.no_grad()
def certainty_target(cos: torch.Tensor, labels: torch.Tensor, mode: str = "paper", eps: float = EPSILON
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target, CCS, NNCCS) from the pre-margin cosines.

    ``paper``: CR = CCS / (NNCCS + 1 + eps), the denominator in [eps, 2 + eps] (Eq. 4).
    ``official``: CR = CCS / NNCCS with the own class filled by -1e-12 before the max, as the released
    code does; NNCCS then floors near 0 and the ratio explodes when every negative cosine is <= 0
    (harmless with 85k classes, unstable with few).
    ``ccs``: the CCS alone (the paper's CCS-FIQA ablation).
    """
    if mode == "paper":
        ccs, nnccs = class_centre_similarities(cos, labels)
        return ccs / (nnccs + 1.0 + eps), ccs, nnccs
    if mode == "official":
        ccs, nnccs = class_centre_similarities(cos, labels, OFFICIAL_OWN_CLASS_FILL)
        return ccs / nnccs, ccs, nnccs
    if mode == "ccs":
        ccs, nnccs = class_centre_similarities(cos, labels)
        return ccs, ccs, nnccs
    raise ValueError(f"cr target must be one of {CR_TARGETS}, not {mode!r}")


class LeaveOneOutCentres:
    """Class centres for the CR target from a bank of per-sample normalised embeddings: a sample's own
    class centre leaves the sample out, so in small classes (2-4 images) CCS measures how well the
    sample matches the *other* images of its identity instead of itself."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.bank = F.normalize(bank.float())
        self.labels = labels.long()
        self.sums = torch.zeros(num_classes, bank.shape[1]).index_add_(0, self.labels, self.bank)
        counts = torch.bincount(self.labels, minlength=num_classes)
        singles = torch.nonzero(counts == 1).flatten()
        if len(singles):  # its centre without it is nothing: CCS would be 0, and so its CR, whatever the face
            raise ValueError(f"{len(singles)} classes have one sample (first: class {int(singles[0])}): leave-one-out "
                             "centres need at least 2 per class; drop them from the data (the training loop can "
                             "also use cr_centres: head)")
        self.empty = counts == 0  # a class without samples has no centre: never the nearest other class

    @torch.no_grad()
    def cosines(self, embeddings: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, C] cosines to every class centre, the own class's centre computed without the sample."""
        index, labels = index.cpu(), labels.cpu()
        e = F.normalize(embeddings.detach().float().cpu())
        cos = F.linear(e, F.normalize(self.sums))
        own = F.normalize(self.sums[labels] - self.bank[index])
        cos[:, self.empty] = -1.0
        cos[torch.arange(len(labels)), labels] = (e * own).sum(1)
        return cos.clamp(-1.0, 1.0).to(embeddings.device)

    def state_dict(self) -> dict:
        """Tensors to save beside a run (the bank is fixed for the run)."""
        return {"bank": self.bank, "labels": self.labels, "num_classes": self.sums.shape[0]}

    @classmethod
    def from_state_dict(cls, state: dict) -> LeaveOneOutCentres:
        """The inverse of ``state_dict``."""
        return cls(state["bank"], state["labels"], int(state["num_classes"]))


@dataclass
class LossOutput:
    """Named losses (the loop sums every ``*_loss``) and a report of what the step saw."""

    ce_loss: torch.Tensor
    quality_loss: torch.Tensor
    report: dict[str, float]

    @property
    def total(self) -> torch.Tensor:
        """The loss to back-propagate."""
        return self.ce_loss + self.quality_loss


class CRFIQALoss(nn.Module):
    """L = CE(ArcFace logits) + lambda * SmoothL1_beta(qs, CR)."""

    def __init__(self, head: ArcFaceHead, target: str = "paper", quality_weight: float = 10.0, beta: float = 0.5) -> None:
        super().__init__()
        if target not in CR_TARGETS:
            raise ValueError(f"cr target must be one of {CR_TARGETS}, not {target!r}")
        self.head, self.target, self.quality_weight, self.beta = head, target, quality_weight, beta

    def forward(self, embeddings: torch.Tensor, quality: torch.Tensor, labels: torch.Tensor,
                target_cosines: torch.Tensor | None = None) -> LossOutput:
        """Both losses for one batch, and means of CCS, NNCCS, CR and the predicted quality.

        ``target_cosines``: the cosines to read CR from (e.g. leave-one-out centres); default the head's.
        Runs in float32 even inside a bf16 autocast region: there ``F.linear`` gives bf16 cosines (errors up to
        4e-3, which would be the CR targets, times s = 64 in the logits) while CUDA autocast forces ``acos``
        to float32, and the margin's scatter of the two dtypes fails."""
        with torch.autocast(embeddings.device.type, enabled=False):
            logits, cos = self.head(embeddings.float(), labels)
            target, ccs, nnccs = certainty_target(cos if target_cosines is None else target_cosines.float(), labels,
                                                  self.target)
            ce = F.cross_entropy(logits, labels)
            qs = quality.float().reshape(-1)
            ql = self.quality_weight * F.smooth_l1_loss(qs, target, beta=self.beta)
        report = {"ccs": ccs.mean().item(), "nnccs": nnccs.mean().item(), "cr": target.mean().item(),
                  "qs": qs.detach().mean().item()}
        return LossOutput(ce, ql, report)
