"""Calls the hooks: callbacks first, then the module, with ``self.log`` pointed at the right collector.

Each hook is an explicit method call. Callbacks that do not override a
per-batch hook are filtered out once per run, and a per-batch hook that
nothing overrides is not called at all (its caller checks the ``any_*`` /
``custom_*`` flag first), because those hooks run thousands of times and the
loop's overhead budget is a few microseconds.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

from runtime.callbacks.base import Callback
from runtime.datamodule import LightningDataModule
from runtime.module import LightningModule

if TYPE_CHECKING:
    from runtime.engine import Engine


def _overriding(callbacks: list[Callback], base_hook: Callable) -> list[Callback]:
    name = base_hook.__name__
    return [cb for cb in callbacks if getattr(type(cb), name) is not base_hook]


def _overrides(obj: Any, base_hook: Callable) -> bool:
    """Whether ``obj``'s class (a LightningModule's, a datamodule's) overrides ``base_hook``."""
    return getattr(type(obj), base_hook.__name__) is not base_hook


class ModuleModes:
    """The train/eval mode of every submodule, to put back after an evaluation (a frozen part stays in eval, as
    in Lightning, where ``module.train()`` would switch it to train mode)."""

    def __init__(self, module: Any):
        self._modes = [(m, m.training) for m in module.modules()]

    def restore(self) -> None:
        for submodule, training in self._modes:
            submodule.training = training


_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def batch_transfer_hooks(
    module: LightningModule, datamodule: LightningDataModule | None
) -> tuple[tuple[Callable[..., Any], ...], bool]:
    """The three batch-transfer hooks to call, in order, and whether any of them is a user's override.

    Each hook is taken from the datamodule where it overrides it, else from the module, as in Lightning; a hook
    that both override runs the datamodule's only, so that case warns.
    """
    hooks, overridden = [], False
    for name in _TRANSFER_HOOKS:
        in_module = _overrides(module, getattr(LightningModule, name))
        in_datamodule = datamodule is not None and _overrides(datamodule, getattr(LightningDataModule, name))
        if in_module and in_datamodule:
            warnings.warn(
                f"both {type(module).__name__}.{name} and {type(datamodule).__name__}.{name} are defined; the "
                f"datamodule's runs and the module's is ignored, as in Lightning. Keep one of them",
                stacklevel=4,
            )
        hooks.append(getattr(datamodule, name) if in_datamodule else getattr(module, name))
        overridden = overridden or in_module or in_datamodule
    return tuple(hooks), overridden


class _Scope:
    """Context manager that points ``self.log`` at the active collector with ``fx``'s rules.

    A small class rather than ``@contextmanager``: the training step enters
    one every step. One instance per hook name is made and reused (entering it
    again while it is active, from a nested call, is fine: what it restores is
    kept on a stack). It writes the module's ``__dict__`` directly because
    ``nn.Module.__setattr__`` type-checks every assignment.
    """

    __slots__ = ("runner", "fx", "saved")

    def __init__(self, runner: "HookRunner", fx: str):
        self.runner = runner
        self.fx = fx
        self.saved: list[tuple] = []

    def __enter__(self) -> None:
        state = self.runner._module_state
        collector = self.runner.engine._active_collector
        self.saved.append(
            (state["_collector"], state["_current_hook"], collector, collector.current_fx if collector else None)
        )
        if collector is not None:
            collector.current_fx = self.fx
        state["_collector"] = collector
        state["_current_hook"] = self.fx

    def __exit__(self, *exc: Any) -> None:
        state = self.runner._module_state
        state["_collector"], state["_current_hook"], collector, previous_fx = self.saved.pop()
        if collector is not None:
            collector.current_fx = previous_fx


class HookRunner:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.module = m = engine.lightning_module
        self._module_state = vars(m)
        self._scopes: dict[str, _Scope] = {}
        cbs = engine.callbacks
        self._train_batch_start = _overriding(cbs, Callback.on_train_batch_start)
        self._train_batch_end = _overriding(cbs, Callback.on_train_batch_end)
        self._before_backward = _overriding(cbs, Callback.on_before_backward)
        self._after_backward = _overriding(cbs, Callback.on_after_backward)
        self._before_optimizer_step = _overriding(cbs, Callback.on_before_optimizer_step)
        self._before_zero_grad = _overriding(cbs, Callback.on_before_zero_grad)
        self._val_batch_start = _overriding(cbs, Callback.on_validation_batch_start)
        self._val_batch_end = _overriding(cbs, Callback.on_validation_batch_end)
        self._test_batch_start = _overriding(cbs, Callback.on_test_batch_start)
        self._test_batch_end = _overriding(cbs, Callback.on_test_batch_end)
        self._predict_batch_start = _overriding(cbs, Callback.on_predict_batch_start)
        self._predict_batch_end = _overriding(cbs, Callback.on_predict_batch_end)
        # Per-step hooks nobody overrides are not called at all (each call costs a scope and a dispatch):
        # their callers check these flags first.
        self.any_train_batch_start = bool(self._train_batch_start) or _overrides(m, LightningModule.on_train_batch_start)
        self.any_train_batch_end = bool(self._train_batch_end) or _overrides(m, LightningModule.on_train_batch_end)
        self.any_before_backward = bool(self._before_backward) or _overrides(m, LightningModule.on_before_backward)
        self.any_after_backward = bool(self._after_backward) or _overrides(m, LightningModule.on_after_backward)
        self.any_before_optimizer_step = bool(self._before_optimizer_step) or _overrides(
            m, LightningModule.on_before_optimizer_step
        )
        self.any_before_zero_grad = bool(self._before_zero_grad) or _overrides(m, LightningModule.on_before_zero_grad)
        self.custom_zero_grad = _overrides(m, LightningModule.optimizer_zero_grad)
        self.custom_clipping = _overrides(m, LightningModule.configure_gradient_clipping) or _overrides(
            m, LightningModule.clip_gradients
        )
        self.custom_backward = _overrides(m, LightningModule.backward)
        self.custom_optimizer_step = _overrides(m, LightningModule.optimizer_step)
        # configure_gradient_clipping runs (after on_before_optimizer_step) only where it can do something.
        self.clips = self.custom_clipping or bool(engine.gradient_clip_val)

    def scope(self, fx: str) -> _Scope:
        """Let ``self.log`` inside this hook write into the active collector, with ``fx``'s defaults."""
        scope = self._scopes.get(fx)
        if scope is None:
            scope = self._scopes[fx] = _Scope(self, fx)
        return scope

    # ------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        e, m = self.engine, self.module
        with self.scope("setup"):
            if e.datamodule is not None:
                e.datamodule.setup(stage)
            for cb in e.callbacks:
                cb.setup(e, m, stage)
            m.setup(stage)

    def teardown(self, stage: str) -> None:
        e, m = self.engine, self.module
        with self.scope("teardown"):
            if e.datamodule is not None:
                e.datamodule.teardown(stage)
            for cb in e.callbacks:
                cb.teardown(e, m, stage)
            m.teardown(stage)

    def on_exception(self, exception: BaseException) -> None:
        e, m = self.engine, self.module
        for cb in e.callbacks:
            cb.on_exception(e, m, exception)
        if e.datamodule is not None:
            e.datamodule.on_exception(exception)

    # --------------------------------------------------------------- fit
    def on_fit_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_fit_start"):
            for cb in e.callbacks:
                cb.on_fit_start(e, m)
            m.on_fit_start()

    def on_fit_end(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_fit_end"):
            for cb in e.callbacks:
                cb.on_fit_end(e, m)
            m.on_fit_end()

    def on_sanity_check_start(self) -> None:
        for cb in self.engine.callbacks:
            cb.on_sanity_check_start(self.engine, self.module)

    def on_sanity_check_end(self) -> None:
        for cb in self.engine.callbacks:
            cb.on_sanity_check_end(self.engine, self.module)

    def on_train_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_train_start"):
            for cb in e.callbacks:
                cb.on_train_start(e, m)
            m.on_train_start()

    def on_train_end(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_train_end"):
            for cb in e.callbacks:
                cb.on_train_end(e, m)
            m.on_train_end()

    def on_train_epoch_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_train_epoch_start"):
            for cb in e.callbacks:
                cb.on_train_epoch_start(e, m)
            m.on_train_epoch_start()

    def on_train_epoch_end(self, monitoring: bool | None) -> None:
        """``monitoring=False``: ordinary callbacks; None: the module; True: checkpoint/early-stopping callbacks."""
        e, m = self.engine, self.module
        with self.scope("on_train_epoch_end"):
            if monitoring is None:
                m.on_train_epoch_end()
                return
            for cb in e.callbacks:
                if _is_monitoring(cb) == monitoring:
                    cb.on_train_epoch_end(e, m)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        e, m = self.engine, self.module
        with self.scope("on_train_batch_start"):
            for cb in self._train_batch_start:
                cb.on_train_batch_start(e, m, batch, batch_idx)
            return m.on_train_batch_start(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        e, m = self.engine, self.module
        with self.scope("on_train_batch_end"):
            for cb in self._train_batch_end:
                cb.on_train_batch_end(e, m, outputs, batch, batch_idx)
            m.on_train_batch_end(outputs, batch, batch_idx)

    # ------------------------------------------------------- optimization
    def on_before_backward(self, loss) -> None:
        e, m = self.engine, self.module
        with self.scope("on_before_backward"):
            for cb in self._before_backward:
                cb.on_before_backward(e, m, loss)
            m.on_before_backward(loss)

    def on_after_backward(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_after_backward"):
            for cb in self._after_backward:
                cb.on_after_backward(e, m)
            m.on_after_backward()

    def on_before_optimizer_step(self, optimizer) -> None:
        e, m = self.engine, self.module
        with self.scope("on_before_optimizer_step"):
            for cb in self._before_optimizer_step:
                cb.on_before_optimizer_step(e, m, optimizer)
            m.on_before_optimizer_step(optimizer)

    def configure_gradient_clipping(self, optimizer) -> None:
        e, m = self.engine, self.module
        with self.scope("configure_gradient_clipping"):
            m.configure_gradient_clipping(
                optimizer,
                gradient_clip_val=e.gradient_clip_val,
                gradient_clip_algorithm=e.gradient_clip_algorithm,
            )

    def on_before_zero_grad(self, optimizer) -> None:
        e, m = self.engine, self.module
        with self.scope("on_before_zero_grad"):
            for cb in self._before_zero_grad:
                cb.on_before_zero_grad(e, m, optimizer)
            m.on_before_zero_grad(optimizer)

    def optimizer_zero_grad(self, batch_idx: int, optimizer) -> None:
        with self.scope("optimizer_zero_grad"):
            self.module.optimizer_zero_grad(self.engine.current_epoch, batch_idx, optimizer)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        self.module.lr_scheduler_step(scheduler, metric)

    # ---------------------------------------------------------- validation
    def on_validation_model_eval(self) -> None:
        self.module.on_validation_model_eval()

    def on_validation_model_train(self, modes: ModuleModes) -> None:
        """After validation: the module's own hook if it has one, else every submodule back in its former mode."""
        if _overrides(self.module, LightningModule.on_validation_model_train):
            self.module.on_validation_model_train()
        else:
            modes.restore()

    def on_validation_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_validation_start"):
            for cb in e.callbacks:
                cb.on_validation_start(e, m)
            m.on_validation_start()

    def on_validation_end(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_validation_end"):
            for cb in e.callbacks:
                cb.on_validation_end(e, m)
            m.on_validation_end()

    def on_validation_epoch_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_validation_epoch_start"):
            for cb in e.callbacks:
                cb.on_validation_epoch_start(e, m)
            m.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_validation_epoch_end"):
            for cb in e.callbacks:
                cb.on_validation_epoch_end(e, m)
            m.on_validation_epoch_end()

    def on_validation_batch_start(self, batch, batch_idx: int, dl_idx: int, num_loaders: int) -> None:
        e, m = self.engine, self.module
        with self.scope("on_validation_batch_start"):
            for cb in self._val_batch_start:
                cb.on_validation_batch_start(e, m, batch, batch_idx, dl_idx)
            if num_loaders > 1:
                m.on_validation_batch_start(batch, batch_idx, dl_idx)
            else:
                m.on_validation_batch_start(batch, batch_idx)

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dl_idx: int, num_loaders: int) -> None:
        e, m = self.engine, self.module
        with self.scope("on_validation_batch_end"):
            for cb in self._val_batch_end:
                cb.on_validation_batch_end(e, m, outputs, batch, batch_idx, dl_idx)
            if num_loaders > 1:
                m.on_validation_batch_end(outputs, batch, batch_idx, dl_idx)
            else:
                m.on_validation_batch_end(outputs, batch, batch_idx)

    # ----------------------------------------------------------------- test
    def on_test_model_eval(self) -> None:
        self.module.on_test_model_eval()

    def on_test_model_train(self, modes: ModuleModes) -> None:
        """After testing: the module's own hook if it has one, else every submodule back in its former mode."""
        if _overrides(self.module, LightningModule.on_test_model_train):
            self.module.on_test_model_train()
        else:
            modes.restore()

    def on_test_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_test_start"):
            for cb in e.callbacks:
                cb.on_test_start(e, m)
            m.on_test_start()

    def on_test_end(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_test_end"):
            for cb in e.callbacks:
                cb.on_test_end(e, m)
            m.on_test_end()

    def on_test_epoch_start(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_test_epoch_start"):
            for cb in e.callbacks:
                cb.on_test_epoch_start(e, m)
            m.on_test_epoch_start()

    def on_test_epoch_end(self) -> None:
        e, m = self.engine, self.module
        with self.scope("on_test_epoch_end"):
            for cb in e.callbacks:
                cb.on_test_epoch_end(e, m)
            m.on_test_epoch_end()

    def on_test_batch_start(self, batch, batch_idx: int, dl_idx: int, num_loaders: int) -> None:
        e, m = self.engine, self.module
        with self.scope("on_test_batch_start"):
            for cb in self._test_batch_start:
                cb.on_test_batch_start(e, m, batch, batch_idx, dl_idx)
            if num_loaders > 1:
                m.on_test_batch_start(batch, batch_idx, dl_idx)
            else:
                m.on_test_batch_start(batch, batch_idx)

    def on_test_batch_end(self, outputs, batch, batch_idx: int, dl_idx: int, num_loaders: int) -> None:
        e, m = self.engine, self.module
        with self.scope("on_test_batch_end"):
            for cb in self._test_batch_end:
                cb.on_test_batch_end(e, m, outputs, batch, batch_idx, dl_idx)
            if num_loaders > 1:
                m.on_test_batch_end(outputs, batch, batch_idx, dl_idx)
            else:
                m.on_test_batch_end(outputs, batch, batch_idx)

    # -------------------------------------------------------------- predict
    def on_predict_start(self) -> None:
        e, m = self.engine, self.module
        m.on_predict_model_eval()
        for cb in e.callbacks:
            cb.on_predict_start(e, m)
        m.on_predict_start()

    def on_predict_end(self) -> None:
        e, m = self.engine, self.module
        for cb in e.callbacks:
            cb.on_predict_end(e, m)
        m.on_predict_end()

    def on_predict_epoch_start(self) -> None:
        e, m = self.engine, self.module
        for cb in e.callbacks:
            cb.on_predict_epoch_start(e, m)
        m.on_predict_epoch_start()

    def on_predict_epoch_end(self) -> None:
        e, m = self.engine, self.module
        for cb in e.callbacks:
            cb.on_predict_epoch_end(e, m)
        m.on_predict_epoch_end()

    def on_predict_batch_start(self, batch, batch_idx: int, dl_idx: int, num_loaders: int) -> None:
        e, m = self.engine, self.module
        for cb in self._predict_batch_start:
            cb.on_predict_batch_start(e, m, batch, batch_idx, dl_idx)
        if num_loaders > 1:
            m.on_predict_batch_start(batch, batch_idx, dl_idx)
        else:
            m.on_predict_batch_start(batch, batch_idx)

    def on_predict_batch_end(self, outputs, batch, batch_idx: int, dl_idx: int, num_loaders: int) -> None:
        e, m = self.engine, self.module
        for cb in self._predict_batch_end:
            cb.on_predict_batch_end(e, m, outputs, batch, batch_idx, dl_idx)
        if num_loaders > 1:
            m.on_predict_batch_end(outputs, batch, batch_idx, dl_idx)
        else:
            m.on_predict_batch_end(outputs, batch, batch_idx)


def _is_monitoring(callback: Callback) -> bool:
    # Checkpointing and early stopping read the epoch's metrics, so they run after the module's own
    # on_train_epoch_end (where users often log epoch metrics), as in Lightning.
    from runtime.callbacks.early_stopping import EarlyStopping
    from runtime.callbacks.model_checkpoint import ModelCheckpoint

    return isinstance(callback, (ModelCheckpoint, EarlyStopping))
