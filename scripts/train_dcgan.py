"""Train GIFD's small DCGAN generator on the *public* half of mnist10k (images 5000-9999).

The gradient-inversion benchmarks draw their targets from images 0-4999 (the clients' part,
``attacks.inversion.data.MNIST_SPLIT``), so the generative prior never sees a target. Non-
saturating GAN loss, Adam 2e-4 (beta1 0.5), batch 64 (Radford et al. 2016). Weights go to a
file outside git (``outputs/dcgan_mnist.pt`` by default; ~0.5 MB) and load with
``attacks.inversion.gifd.load_generator`` (``torch.load(weights_only=True)``).

    python scripts/train_dcgan.py --data ../shared/data/mnist10k.npz --epochs 30 --out outputs/dcgan_mnist.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from attacks.inversion.data import load_pool
from attacks.inversion.gifd import DCGAN, Discriminator


def train(data: str, epochs: int, out: Path, latent_dim: int = 32, channels: int = 32, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, _ = load_pool("mnist", data, part="public")
    gen, disc = DCGAN(latent_dim, channels), Discriminator(channels)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    t0 = time.process_time()
    for ep in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 63, 64):
            real = x[perm[i : i + 64]]
            fake = gen(torch.randn(64, latent_dim))
            opt_d.zero_grad()
            loss_d = bce(disc(real), torch.ones(64)) + bce(disc(fake.detach()), torch.zeros(64))
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            loss_g = bce(disc(fake), torch.ones(64))
            loss_g.backward()
            opt_g.step()
        print(f"epoch {ep + 1}/{epochs}: D {loss_d.item():.3f} G {loss_g.item():.3f} cpu {time.process_time() - t0:.0f}s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latent_dim": latent_dim, "channels": channels, "state_dict": gen.state_dict()}, out)
    gen.eval()
    with torch.no_grad():
        samples = gen(torch.randn(16, latent_dim))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 8, figsize=(6, 1.7))
    for ax, img in zip(axes.flat, samples):
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=72)
    print(f"saved {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mnist10k.npz")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("outputs/dcgan_mnist.pt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train(a.data, a.epochs, a.out, seed=a.seed)
