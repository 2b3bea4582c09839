"""The Lightning guide's manual-optimization GAN, generating 8x8 digits (scikit-learn's bundled set, no download).

    python examples/gan.py                                  # in this process (no Ray): ~20 s
    python examples/gan.py --max-epochs 3                   # shorter
    python examples/gan.py --num-workers 2                  # DDP on two Ray Train workers (a local Ray)
    python examples/gan.py --address auto --num-workers 4 --gpu   # on four GPU workers of a running Ray cluster

Manual optimization as the guide teaches it: ``self.automatic_optimization = False`` in ``__init__``,
two optimizers from ``configure_optimizers``, and in ``training_step`` ``self.optimizers()``, then for
each network ``toggle_optimizer`` / ``manual_backward`` / ``step`` / ``zero_grad`` / ``untoggle_optimizer``.
``g_loss`` and ``d_loss`` go to the progress bar and TensorBoard; checkpoints (both networks, both
optimizers' states) land in ``<root>/<run name>/checkpoints/``. After training, the driver draws a grid
of generated digits from the trained generator into the same TensorBoard run (IMAGES tab) and prints a
few of them as text.

The default trains in this process, because starting Ray costs more than the training itself on a laptop
(30-45 s on a busy 2-core machine). On several workers the Trainer gets
``strategy="ddp_find_unused_parameters_true"``, as a Lightning GAN under DDP does: each of the two backward
passes per ``training_step`` leaves the other network (frozen by ``toggle_optimizer``) without gradients.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from launcher import Trainer
from runtime import LightningModule, ModelCheckpoint, seed_everything

IMAGE_SIZE = 8  # scikit-learn's digits are 8x8, 17 grey levels


class Generator(nn.Module):
    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, IMAGE_SIZE * IMAGE_SIZE),
            nn.Tanh(),
        )

    def forward(self, z):
        return self.model(z).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)


class Discriminator(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, img):
        return self.model(img)  # a logit: real > 0 > fake


class GAN(LightningModule):
    def __init__(self, latent_dim: int = 16, hidden: int = 128, lr: float = 2e-3, b1: float = 0.5, b2: float = 0.999):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, hidden)
        self.discriminator = Discriminator(hidden)

    def forward(self, z):
        return self.generator(z)

    def adversarial_loss(self, logits, target):
        return nn.functional.binary_cross_entropy_with_logits(logits, target)

    def training_step(self, batch):
        imgs, _ = batch
        optimizer_g, optimizer_d = self.optimizers()
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim).type_as(imgs)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)
        fake = torch.zeros(imgs.size(0), 1).type_as(imgs)

        # Train the generator: make the discriminator call its samples real.
        self.toggle_optimizer(optimizer_g)
        generated = self(z)
        g_loss = self.adversarial_loss(self.discriminator(generated), valid)
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        optimizer_g.step()
        optimizer_g.zero_grad()
        self.untoggle_optimizer(optimizer_g)

        # Train the discriminator: tell real images from the (detached) samples.
        self.toggle_optimizer(optimizer_d)
        real_loss = self.adversarial_loss(self.discriminator(imgs), valid)
        fake_loss = self.adversarial_loss(self.discriminator(generated.detach()), fake)
        d_loss = (real_loss + fake_loss) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        optimizer_d.step()
        optimizer_d.zero_grad()
        self.untoggle_optimizer(optimizer_d)

    def configure_optimizers(self):
        lr, betas = self.hparams.lr, (self.hparams.b1, self.hparams.b2)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        return [opt_g, opt_d]


def digit_images(batch_size: int = 64) -> DataLoader:
    """scikit-learn's 1797 digits as 1x8x8 images in [-1, 1] (the generator's Tanh range)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return DataLoader(TensorDataset(images, torch.tensor(data.target)), batch_size=batch_size, shuffle=True)


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 4) -> torch.Tensor:
    """(N, 1, 8, 8) images in [-1, 1] -> one (H, W) image in [0, 1], each pixel ``scale`` x ``scale``."""
    rows = images.shape[0] // columns
    grid = images[: rows * columns, 0].reshape(rows, columns, IMAGE_SIZE, IMAGE_SIZE)
    grid = grid.permute(0, 2, 1, 3).reshape(rows * IMAGE_SIZE, columns * IMAGE_SIZE)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return ((grid + 1) / 2).clamp(0, 1)


def as_text(images: torch.Tensor) -> str:
    """A few images side by side in characters, darkest to brightest."""
    shades = " .:-=+*#%@"
    levels = ((images[:, 0] + 1) / 2 * (len(shades) - 1)).round().clamp(0, len(shades) - 1).long()
    return "\n".join(
        "   ".join("".join(shades[v] for v in levels[i, row]) for i in range(levels.shape[0]))
        for row in range(IMAGE_SIZE)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=0, help="Ray Train workers; 0 (default) trains here")
    parser.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto (default: a local Ray)")
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--root", default="runs", help="default_root_dir: the run directory goes under it")
    parser.add_argument("--gpu", action="store_true", help="GPU workers (needs --num-workers)")
    args = parser.parse_args(argv)

    seed_everything(0)
    trainer = Trainer(
        max_epochs=args.max_epochs,
        num_workers=args.num_workers,
        address=args.address,
        use_gpu=args.gpu,
        strategy="ddp_find_unused_parameters_true" if args.num_workers > 1 else "auto",
        default_root_dir=args.root,
        log_every_n_steps=10,
        callbacks=[ModelCheckpoint(every_n_epochs=10, save_top_k=-1, save_last=True)],
    )
    model = GAN()
    trainer.fit(model, digit_images())

    # The driver's model holds the trained weights: sample from it here, and add the samples to TensorBoard.
    model.eval()
    with torch.no_grad():
        samples = model(torch.randn(32, model.hparams.latent_dim))
    trainer.logger.experiment.add_image("generated_digits", image_grid(samples), trainer.global_step, dataformats="HW")
    trainer.logger.experiment.flush()

    metrics = trainer.callback_metrics
    print(f"\n{as_text(samples[:8])}\n")
    print(f"g_loss={float(metrics['g_loss']):.3f} d_loss={float(metrics['d_loss']):.3f} "
          f"after {trainer.current_epoch} epochs, {trainer.global_step} optimizer steps")
    print(f"run directory:   {trainer.run_dir.path}")
    print(f"last checkpoint: {trainer.checkpoint_callback.last_model_path}")
    print(f"TensorBoard:     tensorboard --logdir {trainer.log_dir}")


if __name__ == "__main__":
    main()
