"""raylight's driver side: the Trainer facade, its validated spec, loggers and the command line."""

from launcher.loggers import CSVLogger, TensorBoardLogger
from launcher.spec import SpecError, TrainerSpec
from launcher.trainer import Trainer

__all__ = ["CSVLogger", "SpecError", "TensorBoardLogger", "Trainer", "TrainerSpec"]
