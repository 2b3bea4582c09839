"""LightningDataModule: data preparation, splits and dataloaders in one object."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping
from typing import Any

from runtime.errors import MisconfigurationError
from runtime.hparams import AttributeDict, collect_init_args, select_hparams


class LightningDataModule:
    """Groups ``prepare_data``, ``setup`` and the four dataloader hooks.

    The engine calls ``prepare_data`` once per node, then ``setup(stage)`` on
    every rank, then the dataloader hook the stage needs. ``state_dict`` is
    saved in checkpoints under the class name.
    """

    def __init__(self) -> None:
        self.trainer = None
        self._hparams: AttributeDict = AttributeDict()
        self._hparams_initial: AttributeDict = AttributeDict()
        self._log_hyperparams = False

    def __getstate__(self) -> dict[str, Any]:
        # As for the module: the trainer is the live run (data iterators, the process group), which a pickled or
        # copied datamodule (the next fit's job, a Ray job) neither can nor should carry.
        return {**self.__dict__, "trainer": None}

    @classmethod
    def from_datasets(
        cls,
        train_dataset: Any = None,
        val_dataset: Any = None,
        test_dataset: Any = None,
        predict_dataset: Any = None,
        batch_size: int = 1,
        num_workers: int = 0,
        **datamodule_kwargs: Any,
    ) -> "LightningDataModule":
        """A datamodule serving these datasets: ``cls(**datamodule_kwargs)`` whose dataloader hooks wrap them.

        Each dataset may also be a list (several dataloaders) or a dict of them. The training data is shuffled,
        the rest is not; a stage without a dataset keeps the class's own hook.
        """
        datamodule = cls(**datamodule_kwargs)
        for hook, dataset, shuffle in (
            ("train_dataloader", train_dataset, True),
            ("val_dataloader", val_dataset, False),
            ("test_dataloader", test_dataset, False),
            ("predict_dataloader", predict_dataset, False),
        ):
            if dataset is not None:
                # A partial of a module-level function: the datamodule still pickles (for Ray, `raylight resume`).
                setattr(datamodule, hook, functools.partial(_dataloaders, dataset, batch_size, num_workers, shuffle))
        return datamodule

    def save_hyperparameters(self, *args: Any, ignore: list[str] | str | None = None, frame=None, logger: bool = True):
        """Record ``__init__`` arguments in ``self.hparams`` (saved under ``datamodule_hyper_parameters``).

        With ``logger=True`` the loggers get them too, merged with the module's, when fit starts.
        """
        if frame is None:
            frame = inspect.currentframe().f_back
        hparams = select_hparams(collect_init_args(self, frame), args, ignore)
        self._log_hyperparams = logger
        self._hparams = AttributeDict(hparams)
        self._hparams_initial = AttributeDict(copy.deepcopy(hparams))

    @property
    def hparams(self) -> AttributeDict:
        return self._hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        return AttributeDict(copy.deepcopy(self._hparams_initial))

    def prepare_data(self) -> None:
        """Download or write data; runs once per node, before ``setup``."""

    def setup(self, stage: str) -> None:
        """Build datasets/splits on every rank; ``stage`` is fit, validate, test or predict."""

    def teardown(self, stage: str) -> None:
        """Clean up after fit, validate, test or predict."""

    def train_dataloader(self):
        """The training DataLoader."""
        raise MisconfigurationError(f"{type(self).__name__}.train_dataloader() is not implemented; trainer.fit needs it")

    def val_dataloader(self):
        """The validation DataLoader(s); None means no validation."""
        return None

    def test_dataloader(self):
        """The test DataLoader(s)."""
        raise MisconfigurationError(f"{type(self).__name__}.test_dataloader() is not implemented; trainer.test needs it")

    def predict_dataloader(self):
        """The predict DataLoader(s)."""
        raise MisconfigurationError(
            f"{type(self).__name__}.predict_dataloader() is not implemented; trainer.predict needs it"
        )

    def transfer_batch_to_device(self, batch: Any, device, dataloader_idx: int) -> Any:
        from runtime.loops.data import move_to_device

        return move_to_device(batch, device)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (weights-only types)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_exception(self, exception: BaseException) -> None:
        """Runs when the run fails."""


def _dataloaders(dataset: Any, batch_size: int, num_workers: int, shuffle: bool) -> Any:
    """``from_datasets``' hooks: a DataLoader per dataset, in the shape the datasets were given."""
    from torch.utils.data import DataLoader

    def make(ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)

    if isinstance(dataset, Mapping):
        return {key: make(ds) for key, ds in dataset.items()}
    if isinstance(dataset, (list, tuple)):
        return [make(ds) for ds in dataset]
    return make(dataset)
