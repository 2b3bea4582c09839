"""raylight's worker side: LightningModule-compatible loops that run in any process.

This package never imports ``ray`` or ``launcher``: it runs alone, under a
``torch.distributed`` process group started by anyone, or in a Ray Train worker.
"""

from runtime.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from runtime.datamodule import LightningDataModule
from runtime.module import LightningModule
from runtime.seed import seed_everything

__all__ = [
    "Callback",
    "EarlyStopping",
    "LearningRateMonitor",
    "LightningDataModule",
    "LightningModule",
    "ModelCheckpoint",
    "seed_everything",
]
