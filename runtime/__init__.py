"""raylight's worker side: LightningModule-compatible loops that run in any process.

This package never imports ``ray`` or ``launcher``: it runs alone, under a
``torch.distributed`` process group started by anyone, or in a Ray Train worker.

The public names load on first use, so a process that only needs a light
submodule (the driver's log writer on Ray reads ``runtime.sinks``) does not
pay for importing torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from runtime._lazy import lazy_exports


def _show_info_messages() -> None:
    """Let ``verbose=True`` messages (seed_everything, EarlyStopping, ModelCheckpoint) reach the console.

    Lightning's users see them without configuring logging; a program that configures logging itself (a
    handler on the root logger) decides for itself.
    """
    package_logger = logging.getLogger(__name__)
    if logging.getLogger().hasHandlers() or package_logger.handlers:
        return
    package_logger.addHandler(logging.StreamHandler())
    package_logger.propagate = False
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)


_show_info_messages()

_EXPORTS = {
    "BasePredictionWriter": "runtime.callbacks",
    "Callback": "runtime.callbacks",
    "EarlyStopping": "runtime.callbacks",
    "LearningRateMonitor": "runtime.callbacks",
    "ModelCheckpoint": "runtime.callbacks",
    "LightningDataModule": "runtime.datamodule",
    "LightningModule": "runtime.module",
    "seed_everything": "runtime.seed",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from runtime.callbacks import BasePredictionWriter, Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from runtime.datamodule import LightningDataModule
    from runtime.module import LightningModule
    from runtime.seed import seed_everything


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
