"""The Callback base class: every hook a callback can implement, and when it runs."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer


class Callback:
    """Subclass and override the hooks you need; the loops call them before the module's own hook.

    ``trainer`` is the runtime's :class:`runtime.engine.Engine` (it has the
    Lightning ``Trainer`` attributes a callback reads: ``current_epoch``,
    ``global_step``, ``callback_metrics``, ``should_stop``, ...).
    """

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint's ``callbacks`` dict."""
        return type(self).__qualname__

    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"{type(self).__qualname__}{repr(kwargs)}"

    # -- setup / teardown: every stage ("fit", "validate", "test", "predict")
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Runs at the start of fit/validate/test/predict, before any loop."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Runs at the end of fit/validate/test/predict."""

    # -- fit
    def on_fit_start(self, trainer, pl_module) -> None:
        """Runs at the very beginning of fit, after setup."""

    def on_fit_end(self, trainer, pl_module) -> None:
        """Runs at the very end of fit."""

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        """Runs before the sanity-check validation batches."""

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        """Runs after the sanity-check validation batches."""

    def on_train_start(self, trainer, pl_module) -> None:
        """Runs when the training loop begins (after the sanity check)."""

    def on_train_end(self, trainer, pl_module) -> None:
        """Runs when the training loop ends."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        """Runs at the start of each training epoch."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Runs at the end of each training epoch, after the module's epoch-end hook."""

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        """Runs before ``training_step``; the module's hook may return -1 to end the epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Runs after the batch's optimizer step (or accumulation)."""

    # -- evaluation and prediction
    def on_validation_start(self, trainer, pl_module) -> None:
        """Runs when a validation pass begins."""

    def on_validation_end(self, trainer, pl_module) -> None:
        """Runs when a validation pass ends (metrics are reduced by then)."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        """Runs at the start of a validation pass."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Runs at the end of a validation pass."""

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs before each ``validation_step``."""

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Runs after each ``validation_step``."""

    def on_test_start(self, trainer, pl_module) -> None:
        """Runs when testing begins."""

    def on_test_end(self, trainer, pl_module) -> None:
        """Runs when testing ends."""

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        """Runs at the start of the test pass."""

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        """Runs at the end of the test pass."""

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs before each ``test_step``."""

    def on_test_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Runs after each ``test_step``."""

    def on_predict_start(self, trainer, pl_module) -> None:
        """Runs when prediction begins."""

    def on_predict_end(self, trainer, pl_module) -> None:
        """Runs when prediction ends."""

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        """Runs at the start of the predict pass."""

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        """Runs at the end of the predict pass."""

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Runs before each ``predict_step``."""

    def on_predict_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Runs after each ``predict_step``."""

    # -- optimization
    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        """Runs before ``loss.backward()``."""

    def on_after_backward(self, trainer, pl_module) -> None:
        """Runs after ``loss.backward()``, before the optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer: Optimizer) -> None:
        """Runs before ``optimizer.step()``, after gradients are unscaled and before clipping."""

    def on_before_zero_grad(self, trainer, pl_module, optimizer: Optimizer) -> None:
        """Runs before ``optimizer.zero_grad()``."""

    # -- errors and checkpoints
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Runs when any hook or step raises, before the exception propagates."""

    def state_dict(self) -> dict[str, Any]:
        """State saved under ``checkpoint["callbacks"][self.state_key]``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Runs while a checkpoint dict is built; may add entries to it."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Runs when a checkpoint is restored, before training resumes."""


def check_unique_state_keys(callbacks: list[Callback]) -> None:
    """Refuse two callbacks that keep state under one key: a checkpoint (and a Ray run's driver) could hold only
    one of their states, and would give it to both. Lightning refuses them too."""
    seen: dict[str, Callback] = {}
    for cb in callbacks:
        if type(cb).state_dict is Callback.state_dict:
            continue  # keeps no state
        key = cb.state_key
        if key in seen:
            raise RuntimeError(
                f"two {type(cb).__name__} callbacks keep their state under the same key {key!r}, so a checkpoint "
                "would restore one's state into both. Give them different settings (ModelCheckpoint: monitor, "
                "mode, every_n_train_steps or every_n_epochs; EarlyStopping: monitor or mode), or, for your own "
                "callback class, a state_key property that tells its instances apart"
            )
        seen[key] = cb
