"""A LightningDataModule and an explicit TensorBoardLogger: fit, then test the best checkpoint.

    python examples/datamodule_tensorboard.py                      # in this process (no Ray): ~10-15 s
    python examples/datamodule_tensorboard.py --max-epochs 2       # shorter
    python examples/datamodule_tensorboard.py --num-workers 2      # a local Ray with 2 CPU workers
    python examples/datamodule_tensorboard.py --address auto --num-workers 4   # a running Ray cluster
    tensorboard --logdir runs/tb_logs                              # then open http://localhost:6006

``DigitsDataModule`` follows the Lightning guide's layout: ``prepare_data`` writes the data once per node
(here scikit-learn's bundled digits, saved as a tensor file in ``--data-dir``; in a real project this is
the download), ``setup(stage)`` builds the train/val/test splits on every rank, and the three
``*_dataloader`` hooks hand them out. The Trainer gets ``datamodule=``, never a DataLoader.

The logger is built explicitly, as in Lightning: ``TensorBoardLogger(save_dir=<root>/tb_logs,
name="digits_cnn")`` writes ``<root>/tb_logs/digits_cnn/version_N/`` (the next free N, picked once), on
this machine even when the workers run elsewhere: their metric rows reach the driver through Ray. Train
and validation curves, the learning rate (``LearningRateMonitor``), the test metrics and the model's and
the datamodule's hyperparameters, merged as Lightning does (HPARAMS tab), all land there. Checkpoints stay in the run directory
``<root>/<run name>/checkpoints/`` and hold both hyperparameter sets (``hyper_parameters``,
``datamodule_hyper_parameters``); ``trainer.test(ckpt_path="best")`` evaluates the best one on the test
split.

The default trains in this process, because starting Ray costs more than this training on a laptop:
with ``--num-workers N``, ``fit`` and ``test`` are two Ray Train runs and each pays the worker start-up
(30-45 s on a busy 2-core machine). There ``prepare_data`` runs once on each node and every rank sees its own
shard of each split; ``--data-dir`` must be a writable path on the worker nodes.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from launcher import TensorBoardLogger, Trainer
from runtime import LearningRateMonitor, LightningDataModule, LightningModule, ModelCheckpoint, seed_everything


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 1797 8x8 digits as 1x8x8 images in [0, 1], split 70/15/15 into train/val/test."""

    def __init__(self, data_dir: str = os.path.join(tempfile.gettempdir(), "raylight-digits"), batch_size: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.path = os.path.join(data_dir, "digits.pt")

    def prepare_data(self):
        # Once per node, before setup(): fetch or write the data here, never assign state (other ranks
        # would not see it).
        if not os.path.exists(self.path):
            from sklearn.datasets import load_digits

            digits = load_digits()
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            torch.save({"images": torch.tensor(digits.images, dtype=torch.float32) / 16.0,
                        "labels": torch.tensor(digits.target)}, tmp)
            os.replace(tmp, self.path)  # atomic: a concurrent reader never sees half a file

    def setup(self, stage: str):
        # On every rank; the generator's seed makes every rank (and every run) cut the same splits.
        data = torch.load(self.path, weights_only=True)
        full = TensorDataset(data["images"].unsqueeze(1), data["labels"])
        self.train_set, self.val_set, self.test_set = random_split(
            full, [0.7, 0.15, 0.15], generator=torch.Generator().manual_seed(42)
        )

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=256)


class DigitsCNN(LightningModule):
    def __init__(self, channels: int = 16, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * 4, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-workers", type=int, default=0, help="Ray Train workers; 0 (default) trains here")
    parser.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto (default: a local Ray)")
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--root", default="runs", help="default_root_dir; TensorBoard logs go to <root>/tb_logs")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "raylight-digits"),
                        help="where prepare_data() writes the data set (on every node)")
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, for smoke tests")
    args = parser.parse_args(argv)

    seed_everything(0)
    logger = TensorBoardLogger(save_dir=os.path.join(args.root, "tb_logs"), name="digits_cnn")
    trainer = Trainer(
        max_epochs=args.max_epochs,
        num_workers=args.num_workers,
        address=args.address,
        default_root_dir=args.root,
        fast_dev_run=args.fast_dev_run,
        logger=logger,
        log_every_n_steps=5,
        callbacks=[ModelCheckpoint(monitor="val_acc", mode="max", save_last=True), LearningRateMonitor("epoch")],
    )
    datamodule = DigitsDataModule(data_dir=args.data_dir)
    model = DigitsCNN()
    trainer.fit(model, datamodule=datamodule)
    epochs = trainer.current_epoch  # test() keeps the fitted counters, as in Lightning
    # The best checkpoint by val_acc, not the last weights, on the split no decision has looked at.
    results = trainer.test(model, datamodule=datamodule, ckpt_path=None if args.fast_dev_run else "best")

    tested = "the last weights" if args.fast_dev_run else f"the best of {epochs} epochs by val_acc"
    print(f"\ntest_acc={results[0]['test_acc']:.3f} ({tested})")
    print(f"best checkpoint: {trainer.checkpoint_callback.best_model_path}")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"view them with:   tensorboard --logdir {os.path.dirname(os.path.dirname(logger.log_dir))}")


if __name__ == "__main__":
    main()
