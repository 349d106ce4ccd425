"""Training throughput (samples/s of forward + backward + SGD step) by backbone and batch size; prints a table.

    python benchmarks/train_throughput.py --backbones mobilefacenet,iresnet18,iresnet50 --batch-sizes 16,64

On a GPU it runs bf16 autocast as the training loop does.
"""

from __future__ import annotations

import argparse
import time

import torch

from crfiqa.training.backbones import create_backbone
from crfiqa.training.losses import ArcFaceHead, CRFIQALoss


def measure(name: str, batch: int, steps: int, device: torch.device, classes: int = 1000) -> float:
    """Samples per second over ``steps`` timed steps (after two warm-up steps)."""
    model = create_backbone(name).to(device).train()
    head = ArcFaceHead(model.embedding_size, classes).to(device)
    loss_fn = CRFIQALoss(head)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 112, 112, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for i in range(steps + 2):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with amp:
            out = model(x)
            loss = loss_fn(out.embedding, out.quality, y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="mobilefacenet,iresnet18,iresnet50")
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntraining throughput on {name} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'})")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{'backbone':<16}" + "".join(f"{'bs ' + str(b):>12}" for b in sizes) + "   (samples/s)")
    for backbone in args.backbones.split(","):
        print(f"{backbone:<16}" + "".join(f"{measure(backbone, b, args.steps, device):>12.1f}" for b in sizes))


if __name__ == "__main__":
    main()
