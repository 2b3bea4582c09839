"""The LightningModule guide's classifier, trained on scikit-learn's bundled digits (no download).

    python examples/classifier.py                    # a local Ray with 2 CPU workers (started for this run)
    python examples/classifier.py --num-workers 0    # in this process, no Ray: seconds, handy for debugging
    python examples/classifier.py --max-epochs 2     # shorter
    python examples/classifier.py --address auto --num-workers 4   # on a node of a running Ray cluster

The module is written exactly as the Lightning guide teaches (``training_step``, ``validation_step``,
``configure_optimizers`` with a monitored scheduler, ``self.log``, ``save_hyperparameters``); only the
imports differ. The run directory ``<root>/<run name>/`` on this machine receives the TensorBoard event
files and the checkpoints (``checkpoints/last.ckpt`` and the best by ``val_acc``), streamed back from the
workers through Ray, and the script prints where they are. ``raylight ls <root>`` lists the runs.

With Ray, most of the wall time is start-up (local Ray, then Ray Train's controller, worker actors and
process group: 30-45 s on a busy 2-core machine); the 10 epochs themselves take a few seconds. On a
cluster set ``RAY_AUTH_MODE=token`` (see the README's Security section) and use ``--address``:
``deploy/train_digits.py`` is this model's entrypoint for the Docker image and the KubeRay manifests.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from launcher import Trainer
from runtime import EarlyStopping, LightningModule, ModelCheckpoint, seed_everything


class DigitClassifier(LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        # sync_dist: every rank sees the mean over all ranks' batches, so checkpointing, early stopping
        # and the scheduler decide on the same number everywhere (the guide's advice for epoch-level metrics).
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=2)
        return {"optimizer": optimizer, "lr_scheduler": scheduler, "monitor": "val_loss"}


def digits(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 1797 8x8 digit images (shipped with the package), scaled to [0, 1]; an 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train, val = random_split(TensorDataset(x, y), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


def callbacks() -> list[Any]:
    """Keep the best checkpoint by validation accuracy plus last.ckpt; stop when val_loss stalls."""
    return [
        ModelCheckpoint(monitor="val_acc", mode="max", save_last=True),
        EarlyStopping(monitor="val_loss", patience=3),
    ]


def train(**trainer_kwargs: Any) -> Trainer:
    """Fit a fresh DigitClassifier with ``Trainer(**trainer_kwargs)`` and print where its files went.

    ``trainer_kwargs`` may override the defaults here: ``log_every_n_steps=10`` and ``callbacks()``.
    """
    seed_everything(0)
    train_loader, val_loader = digits()
    trainer = Trainer(**{"log_every_n_steps": 10, "callbacks": callbacks(), **trainer_kwargs})
    trainer.fit(DigitClassifier(), train_loader, val_loader)
    print(f"\nval_acc={float(trainer.callback_metrics['val_acc']):.3f} after {trainer.current_epoch} epochs")
    print(f"run directory:   {trainer.run_dir.path}")
    print(f"best checkpoint: {trainer.checkpoint_callback.best_model_path}")
    print(f"last checkpoint: {trainer.checkpoint_callback.last_model_path}")
    print(f"TensorBoard:     tensorboard --logdir {trainer.log_dir}")
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default 2); 0 trains here")
    parser.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto (default: a local Ray)")
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--root", default="runs", help="default_root_dir: the run directory goes under it")
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, for smoke tests")
    args = parser.parse_args(argv)
    train(
        max_epochs=args.max_epochs,
        num_workers=args.num_workers,
        address=args.address,
        default_root_dir=args.root,
        fast_dev_run=args.fast_dev_run,
    )


if __name__ == "__main__":
    main()
