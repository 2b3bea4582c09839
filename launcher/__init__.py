"""raylight's driver side: the Trainer facade, its validated spec, loggers and the command line.

The public names load on first use, so ``raylight ls`` and the driver's log
writer on Ray start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime._lazy import lazy_exports

_EXPORTS = {
    "CSVLogger": "launcher.loggers",
    "TensorBoardLogger": "launcher.loggers",
    "SpecError": "launcher.spec",
    "TrainerSpec": "launcher.spec",
    "Trainer": "launcher.trainer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from launcher.loggers import CSVLogger, TensorBoardLogger
    from launcher.spec import SpecError, TrainerSpec
    from launcher.trainer import Trainer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
