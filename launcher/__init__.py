"""raylight's driver side: the Trainer facade, its validated spec, loggers and the command line.

The public names load on first use, so ``raylight ls`` and the driver's log
writer on Ray start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
