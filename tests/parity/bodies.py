"""Module bodies shared by several parity tests (see harness.py for how they become two modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Regressor:
    """A two-layer regressor trained with SGD + momentum; logs train_loss per step and val_loss per epoch."""

    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class DropoutRegressor(Regressor):
    """Regressor with dropout, so the global RNG stream during training matters too."""

    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__(lr=lr, hidden=hidden)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(0.3), nn.Linear(hidden, 1))
