"""LightningModule: the user's model, its steps, optimizers and hooks.

Everything here runs on a worker (or in the driver with ``num_workers=0``).
The engine attaches itself as ``self.trainer`` and hands a metric collector
in before each hook, so ``self.log`` needs nothing global.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from runtime.errors import MisconfigurationError
from runtime.hparams import AttributeDict, collect_init_args, hparams_name, select_hparams
from runtime.logging.collector import metric_collection_items


class LightningModule(nn.Module):
    """An ``nn.Module`` plus the step hooks, ``configure_optimizers`` and ``self.log``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer = None
        self._automatic_optimization = True
        self._hparams: AttributeDict = AttributeDict()
        self._hparams_initial: AttributeDict = AttributeDict()
        self._collector = None  # set by the engine around each hook that may log
        self._current_hook: str | None = None  # the hook running now, for error messages
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        # pickle and copy.deepcopy both come here. The trainer and the hook's collector are the live run
        # (data iterators, the process group, the loggers): they cannot be pickled, and a copy (an EMA
        # callback's, a job shipped to Ray) must not drive or log into the run it was taken from. As in
        # Lightning, the copy is a plain module, attached to no trainer.
        state = dict(self.__dict__)
        state["_trainer"] = None
        state["_collector"] = None
        state["_current_hook"] = None
        return state

    @property
    def trainer(self):
        if self._trainer is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a Trainer; `self.trainer` is only available inside "
                "trainer.fit/validate/test/predict"
            )
        return self._trainer

    @trainer.setter
    def trainer(self, trainer) -> None:
        self._trainer = trainer

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def global_rank(self) -> int:
        return self._trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self._trainer.local_rank if self._trainer is not None else 0

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.get_default_dtype()

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def automatic_optimization(self) -> bool:
        return self._automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = bool(value)

    @property
    def logger(self):
        return self._trainer.logger if self._trainer is not None else None

    @property
    def loggers(self) -> list:
        return self._trainer.loggers if self._trainer is not None else []

    # --------------------------------------------------------- hyperparameters
    def save_hyperparameters(self, *args: Any, ignore: list[str] | str | None = None, frame=None, logger: bool = True):
        """Record ``__init__`` arguments in ``self.hparams`` and in every checkpoint.

        Call it inside ``__init__``. Pass names to keep only those arguments,
        ``ignore=[...]`` to drop some, or a dict to record that dict.
        """
        if frame is None:
            frame = inspect.currentframe().f_back
        init_args = collect_init_args(self, frame)
        hparams = select_hparams(init_args, args, ignore)
        self._hparams_name = hparams_name(init_args, args)
        self._log_hyperparams = logger
        self._hparams = AttributeDict(hparams)
        self._hparams_initial = AttributeDict(copy.deepcopy(hparams))

    @property
    def hparams(self) -> AttributeDict:
        return self._hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        return AttributeDict(copy.deepcopy(self._hparams_initial))

    # ----------------------------------------------------------------- logging
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Any = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        metric_attribute: str | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """Record a scalar for the progress bar, the loggers and ``trainer.callback_metrics``.

        Defaults depend on the hook: step hooks of training log per step,
        validation/test steps and all epoch-level hooks log per epoch.
        ``sync_dist=True`` reduces the value across ranks with ``reduce_fx``.
        """
        if self._collector is None:
            if self._trainer is None:
                # Lightning ignores log() outside a trainer (e.g. a unit test calling training_step).
                return
            where = f"in `{self._current_hook}`" if self._current_hook else "outside the trainer's hooks"
            raise MisconfigurationError(
                f"self.log({name!r}, ...) is not allowed {where}; log from the step hooks, the batch/epoch start "
                "and end hooks, or the backward/optimizer hooks"
            )
        self._collector.log(
            name,
            value,
            prog_bar=prog_bar,
            logger=True if logger is None else logger,
            on_step=on_step,
            on_epoch=on_epoch,
            reduce_fx=reduce_fx,
            enable_graph=enable_graph,
            sync_dist=sync_dist,
            add_dataloader_idx=add_dataloader_idx,
            batch_size=batch_size,
            rank_zero_only=rank_zero_only,
        )

    def log_dict(
        self,
        dictionary: Mapping[str, Any],
        prog_bar: bool = False,
        logger: bool | None = None,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Any = "mean",
        enable_graph: bool = False,
        sync_dist: bool = False,
        sync_dist_group: Any = None,
        add_dataloader_idx: bool = True,
        batch_size: int | None = None,
        rank_zero_only: bool = False,
    ) -> None:
        """``self.log`` for every item of ``dictionary`` with the same options.

        ``dictionary`` may be a torchmetrics ``MetricCollection``: each Metric is logged under its name.
        """
        for key, value in metric_collection_items(dictionary):
            self.log(
                key,
                value,
                prog_bar=prog_bar,
                logger=logger,
                on_step=on_step,
                on_epoch=on_epoch,
                reduce_fx=reduce_fx,
                enable_graph=enable_graph,
                sync_dist=sync_dist,
                add_dataloader_idx=add_dataloader_idx,
                batch_size=batch_size,
                rank_zero_only=rank_zero_only,
            )

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Gather tensors (or a collection of them) from every rank along a new first dimension.

        In a single process the data comes back as it is, with no new dimension, as in Lightning.
        """
        if self._trainer is None:
            return data
        return self._trainer.strategy.all_gather(data, sync_grads=sync_grads)

    # ------------------------------------------------------------ optimization
    def optimizers(self, use_pl_optimizer: bool = True):
        """The optimizer(s) from ``configure_optimizers``: one object, or a list when there are several."""
        wrappers = self.trainer._optimizer_wrappers if use_pl_optimizer else self.trainer.optimizers
        if len(wrappers) == 1:
            return wrappers[0]
        return list(wrappers)

    def lr_schedulers(self):
        """The scheduler(s) from ``configure_optimizers``: None, one, or a list."""
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        if len(schedulers) == 1:
            return schedulers[0]
        return schedulers

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward for manual optimization: applies the precision scaler and calls the backward hooks."""
        if self.automatic_optimization:
            raise MisconfigurationError(
                "manual_backward() is for manual optimization; set `self.automatic_optimization = False` in "
                "__init__, or return the loss from training_step and let the trainer call backward"
            )
        self.trainer._backward(loss, None, *args, **kwargs)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Called to compute gradients; override for custom backward logic."""
        loss.backward(*args, **kwargs)

    def toggle_optimizer(self, optimizer) -> None:
        """Make only ``optimizer``'s parameters require grad (for multi-optimizer manual steps)."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        own = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._toggled_requires_grad = {}
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    if id(param) not in own:
                        self._toggled_requires_grad.setdefault(param, param.requires_grad)
                        param.requires_grad = False

    def untoggle_optimizer(self, optimizer) -> None:
        """Undo :meth:`toggle_optimizer`."""
        for param, requires_grad in getattr(self, "_toggled_requires_grad", {}).items():
            param.requires_grad = requires_grad
        self._toggled_requires_grad = {}

    @contextmanager
    def toggled_optimizer(self, optimizer) -> Iterator[None]:
        """:meth:`toggle_optimizer` for the ``with`` block, then :meth:`untoggle_optimizer`, even if it raised."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients of ``optimizer``'s parameters by norm (default) or by value.

        An argument left out is the Trainer's (``gradient_clip_val``, ``gradient_clip_algorithm``), as in
        Lightning: an override of ``configure_gradient_clipping`` may call ``self.clip_gradients(optimizer)``.
        """
        trainer = self._trainer
        trainer_val = getattr(trainer, "gradient_clip_val", None)
        trainer_algorithm = getattr(trainer, "gradient_clip_algorithm", None)
        for name, given, configured in (
            ("gradient_clip_val", gradient_clip_val, trainer_val),
            ("gradient_clip_algorithm", gradient_clip_algorithm, trainer_algorithm),
        ):
            if given is not None and configured is not None and given != configured:
                raise MisconfigurationError(
                    f"clip_gradients({name}={given!r}) disagrees with Trainer({name}={configured!r}); set it in "
                    "one place: the Trainer's value is what clip_gradients uses when the argument is left out"
                )
        gradient_clip_val = trainer_val if gradient_clip_val is None else gradient_clip_val
        if gradient_clip_val is None or gradient_clip_val == 0:
            return
        algorithm = str(gradient_clip_algorithm or trainer_algorithm or "norm").lower()  # "Norm" too, as in Lightning
        optimizer = getattr(optimizer, "optimizer", optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, max_norm=gradient_clip_val)
        elif algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_value=gradient_clip_val)
        else:
            raise MisconfigurationError(
                f"gradient_clip_algorithm={algorithm!r} is not supported; use 'norm' or 'value'"
            )

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Runs before each optimizer step, after unscaling; default clips with the Trainer's settings."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Steps ``optimizer``; the closure runs training_step and backward. Override for LR warm-up etc."""
        optimizer.step(closure=optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """Zeroes the gradients before the first backward of each accumulation window."""
        optimizer.zero_grad()

    def lr_scheduler_step(self, scheduler, metric: Any) -> None:
        """Steps a scheduler; ``metric`` is the monitored value for ReduceLROnPlateau."""
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def configure_optimizers(self):
        """Return the optimizer(s) and optional scheduler(s) (every Lightning format is accepted)."""
        raise MisconfigurationError(
            f"{type(self).__name__}.configure_optimizers() is not implemented; return an optimizer, e.g. "
            "`return torch.optim.Adam(self.parameters(), lr=1e-3)`"
        )

    def configure_callbacks(self):
        """Callbacks the module adds to the Trainer's (replacing ones of the same type)."""
        return []

    # ------------------------------------------------------------------- steps
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any):
        """Return the loss tensor, a dict with a ``"loss"`` key, or None to skip the batch."""
        raise MisconfigurationError(
            f"{type(self).__name__}.training_step(batch, batch_idx) is not implemented; trainer.fit needs it"
        )

    def validation_step(self, *args: Any, **kwargs: Any):
        """Runs on each validation batch; log metrics with ``self.log``."""

    def test_step(self, *args: Any, **kwargs: Any):
        """Runs on each test batch; log metrics with ``self.log``."""

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Returns the prediction for one batch; default calls ``self(batch)``."""
        return self(batch)

    # ------------------------------------------------------------------- data
    def prepare_data(self) -> None:
        """Download or write data; runs once per node before ``setup``."""

    def setup(self, stage: str) -> None:
        """Runs at the start of fit/validate/test/predict on every rank."""

    def teardown(self, stage: str) -> None:
        """Runs at the end of fit/validate/test/predict on every rank."""

    def train_dataloader(self):
        """The training DataLoader (or pass ``train_dataloaders`` to ``fit``)."""
        raise MisconfigurationError(
            f"no training data: implement {type(self).__name__}.train_dataloader() or pass "
            "`train_dataloaders=` / `datamodule=` to trainer.fit"
        )

    def val_dataloader(self):
        """The validation DataLoader(s)."""
        return None

    def test_dataloader(self):
        """The test DataLoader(s)."""
        raise MisconfigurationError(
            f"no test data: implement {type(self).__name__}.test_dataloader() or pass `dataloaders=` / "
            "`datamodule=` to trainer.test"
        )

    def predict_dataloader(self):
        """The predict DataLoader(s)."""
        raise MisconfigurationError(
            f"no predict data: implement {type(self).__name__}.predict_dataloader() or pass `dataloaders=` / "
            "`datamodule=` to trainer.predict"
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Alter the batch before it is moved to the device."""
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move every tensor in the batch to ``device``."""
        from runtime.loops.data import move_to_device

        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Alter the batch after it is on the device."""
        return batch

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        """Runs at the start of fit, after setup."""

    def on_fit_end(self) -> None:
        """Runs at the end of fit."""

    def on_train_start(self) -> None:
        """Runs when the training loop begins (after the sanity check)."""

    def on_train_end(self) -> None:
        """Runs when the training loop ends."""

    def on_train_epoch_start(self) -> None:
        """Runs at the start of each training epoch."""

    def on_train_epoch_end(self) -> None:
        """Runs at the end of each training epoch."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Runs before ``training_step``; return -1 to skip the rest of the epoch."""
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Runs after the batch's optimization."""

    def on_validation_start(self) -> None:
        """Runs when a validation pass begins."""

    def on_validation_end(self) -> None:
        """Runs when a validation pass ends."""

    def on_validation_epoch_start(self) -> None:
        """Runs at the start of a validation pass."""

    def on_validation_epoch_end(self) -> None:
        """Runs at the end of a validation pass."""

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs before each ``validation_step``."""

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs after each ``validation_step``."""

    def on_validation_model_zero_grad(self) -> None:
        """Runs before validation inside fit (not mid-accumulation); frees the gradients' memory."""
        self.zero_grad(set_to_none=True)

    def on_validation_model_eval(self) -> None:
        """Puts the model in eval mode for validation."""
        self.eval()

    def on_validation_model_train(self) -> None:
        """Puts the model back in train mode after validation."""
        self.train()

    def on_test_start(self) -> None:
        """Runs when testing begins."""

    def on_test_end(self) -> None:
        """Runs when testing ends."""

    def on_test_epoch_start(self) -> None:
        """Runs at the start of the test pass."""

    def on_test_epoch_end(self) -> None:
        """Runs at the end of the test pass."""

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs before each ``test_step``."""

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs after each ``test_step``."""

    def on_test_model_eval(self) -> None:
        """Puts the model in eval mode for testing."""
        self.eval()

    def on_test_model_train(self) -> None:
        """Puts the model back in train mode after testing."""
        self.train()

    def on_predict_start(self) -> None:
        """Runs when prediction begins."""

    def on_predict_end(self) -> None:
        """Runs when prediction ends."""

    def on_predict_epoch_start(self) -> None:
        """Runs at the start of the predict pass."""

    def on_predict_epoch_end(self) -> None:
        """Runs at the end of the predict pass."""

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs before each ``predict_step``."""

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs after each ``predict_step``."""

    def on_predict_model_eval(self) -> None:
        """Puts the model in eval mode for prediction."""
        self.eval()

    def on_before_backward(self, loss: Tensor) -> None:
        """Runs before ``loss.backward()``."""

    def on_after_backward(self) -> None:
        """Runs after ``loss.backward()`` and before the optimizer step."""

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Runs before ``optimizer.step()``, after unscaling, before clipping."""

    def on_before_zero_grad(self, optimizer: Optimizer) -> None:
        """Runs before ``optimizer.zero_grad()``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs while a checkpoint dict is built; add entries to it here."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs when a checkpoint is restored, before its state_dict is loaded."""

    # -------------------------------------------------------------- utilities
    def freeze(self) -> None:
        """Stop gradients for every parameter and switch to eval mode."""
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        """Undo :meth:`freeze`."""
        for param in self.parameters():
            param.requires_grad = True
        self.train()

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str,
        map_location: Any = None,
        hparams_file: str | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
        **overrides: Any,
    ):
        """Build the module from a checkpoint's hyperparameters (``overrides`` win) and load its weights.

        As in Lightning, hyperparameters recorded from one dict argument (``save_hyperparameters(config)``)
        are passed back as that argument, and those ``__init__`` does not take are left out (unless it takes
        ``**kwargs``). The file is read with ``torch.load(weights_only=True)``: a checkpoint with pickled
        objects is refused, never executed (``weights_only=False`` is refused for that reason).
        """
        from runtime.checkpoint.io import check_state_dict_compatible, load_checkpoint, required_keys

        if weights_only is False:
            raise ValueError(
                f"load_from_checkpoint({checkpoint_path!r}, weights_only=False): raylight reads checkpoints only "
                "with torch.load(weights_only=True), so that loading one never runs code from it. Leave "
                "weights_only out; a checkpoint that needs pickled objects must be re-saved without them"
            )
        checkpoint = load_checkpoint(str(checkpoint_path), map_location=map_location)
        required_keys(checkpoint, ["state_dict"], str(checkpoint_path))
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        params = inspect.signature(cls.__init__).parameters
        name = checkpoint.get("hparams_name")
        if name not in (None, "kwargs") and name in params:
            hparams = {name: hparams}
        hparams.update(overrides)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            hparams = {k: v for k, v in hparams.items() if k in params}
        try:
            model = cls(**hparams)
        except TypeError as err:
            raise TypeError(
                f"{cls.__name__}(**hparams) failed while loading {checkpoint_path}: {err}. The checkpoint "
                f"saved hyperparameters {sorted(checkpoint.get('hyper_parameters') or {})}; pass the missing "
                f"__init__ arguments as keyword overrides to load_from_checkpoint"
            ) from err
        model.on_load_checkpoint(checkpoint)
        if strict:
            check_state_dict_compatible(model.state_dict(), checkpoint["state_dict"], str(checkpoint_path))
        keys = model.load_state_dict(checkpoint["state_dict"], strict=strict)
        if not strict:
            for what, names in (("not in the checkpoint", keys.missing_keys), ("not in the model", keys.unexpected_keys)):
                if names:
                    warnings.warn(
                        f"load_from_checkpoint({str(checkpoint_path)!r}, strict=False): keys {what}, left as they "
                        f"were: {names}",
                        stacklevel=2,
                    )
        if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
            model.to(map_location)
        return model
