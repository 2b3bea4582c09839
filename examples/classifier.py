"""The LightningModule guide's classifier, trained on scikit-learn's bundled digits (no download).

    python examples/classifier.py                 # in this process (num_workers=0)
    python examples/classifier.py --max-epochs 3  # shorter

It writes TensorBoard logs and checkpoints under ./runs/<run name>/ and prints where.
"""

from __future__ import annotations

import argparse

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
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=2)
        return {"optimizer": optimizer, "lr_scheduler": scheduler, "monitor": "val_loss"}


def digits() -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train, val = random_split(TensorDataset(x, y), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=0, help="Ray workers; 0 trains in this process")
    parser.add_argument("--root", default="runs", help="default_root_dir for the run directory")
    parser.add_argument("--fast-dev-run", action="store_true", help="one batch of each stage, for smoke tests")
    args = parser.parse_args(argv)

    seed_everything(0)
    train, val = digits()
    trainer = Trainer(
        max_epochs=args.max_epochs,
        num_workers=args.num_workers,
        default_root_dir=args.root,
        fast_dev_run=args.fast_dev_run,
        callbacks=[
            ModelCheckpoint(monitor="val_acc", mode="max", save_last=True),
            EarlyStopping(monitor="val_loss", patience=3),
        ],
    )
    model = DigitClassifier()
    trainer.fit(model, train, val)
    print(f"\nval_acc={float(trainer.callback_metrics['val_acc']):.3f} after {trainer.current_epoch} epochs")
    print(f"run directory:   {trainer.run_dir.path}")
    print(f"best checkpoint: {trainer.checkpoint_callback.best_model_path}")
    print(f"TensorBoard:     tensorboard --logdir {trainer.log_dir}")


if __name__ == "__main__":
    main()
