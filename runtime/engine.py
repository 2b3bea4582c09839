"""The worker-side trainer: wires module, data, strategy, precision, loops and sinks.

A module's ``self.trainer`` is this object, so it carries the Lightning
``Trainer`` attributes user code reads (``current_epoch``, ``global_step``,
``callback_metrics``, ``should_stop``, ``estimated_stepping_batches`` ...).
It knows nothing about Ray or the driver: results leave through the sinks.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from runtime.callbacks.base import Callback, check_unique_state_keys
from runtime.callbacks.early_stopping import EarlyStopping
from runtime.callbacks.model_checkpoint import ModelCheckpoint
from runtime.checkpoint.io import CheckpointError, check_state_dict_compatible, load_checkpoint, required_keys
from runtime.config import RunConfig
from runtime.datamodule import LightningDataModule
from runtime.errors import MisconfigurationError, NonFiniteLossError
from runtime.hparams import checkpointable_hparams, hparams_for_loggers
from runtime.loops.data import PreparedLoader, as_loader_list, prepare_loader
from runtime.loops.evaluation import EvaluationLoop
from runtime.loops.fit import FitLoop
from runtime.loops.hooks import HookRunner, batch_transfer_hooks
from runtime.loops.optimization import AutomaticOptimization, ManualOptimization, OptimizerWrapper
from runtime.loops.prediction import PredictionLoop
from runtime.module import LightningModule
from runtime.optimizers import LRSchedulerConfig, parse_optimizers, scheduler_configs
from runtime.precision import Precision, requires_closure
from runtime.seed import capture_rng_state, restore_rng_state
from runtime.sinks import CheckpointSink, LocalCheckpointSink, MetricsSink, NullMetricsSink, Progress
from runtime.state import RunningStage, TrainerFn, TrainerState
from runtime.strategy import Strategy

CHECKPOINT_FORMAT = 1
# The Lightning release whose checkpoint keys raylight's follow. Written as "pytorch-lightning_version", which
# Lightning's loader requires: its load_from_checkpoint then reads a raylight checkpoint's weights and
# hyperparameters. The loop state ("loops") is raylight's own, so neither side resumes the other's training.
LIGHTNING_CHECKPOINT_VERSION = "2.6.6"


class _StepDispatcher(nn.Module):
    """Routes DDP's forward to ``training_step`` so DDP's gradient hooks see the real graph."""

    def __init__(self, module: LightningModule):
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module.training_step(*args)


def _accepts(fn: Any, name: str, min_args: int) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    if name in params or any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        return True
    return len(params) >= min_args


class Engine:
    def __init__(
        self,
        config: RunConfig | None = None,
        callbacks: list[Callback] | None = None,
        metrics_sink: MetricsSink | None = None,
        checkpoint_sink: CheckpointSink | None = None,
        loggers: list[Any] | None = None,
        strategy: Strategy | None = None,
        preemption_probe: Callable[[], bool] | None = None,
    ):
        self.config = config or RunConfig()
        self.strategy = strategy or Strategy(self.config.accelerator, self.config.find_unused_parameters)
        self.callbacks: list[Callback] = list(callbacks or [])
        self.loggers = list(loggers or [])
        is_zero = self.strategy.is_global_zero
        self.metrics_sink: MetricsSink = metrics_sink if (metrics_sink is not None and is_zero) else NullMetricsSink()
        # Without loggers no row is built: float() of a CUDA value would make the CPU wait for the GPU's
        # queue to drain every log_every_n_steps, for nothing.
        self._wants_metrics = getattr(self.metrics_sink, "wants_metrics", True)
        self.checkpoint_sink: CheckpointSink = checkpoint_sink or LocalCheckpointSink()
        self._checkpoint_files: set[str] = set()  # see checkpoint_files_in
        self.precision_plugin = Precision(self.config.precision, self.strategy.root_device)
        self.state = TrainerState()
        self.current_epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.lightning_module: LightningModule | None = None
        self.datamodule: LightningDataModule | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self._optimizer_wrappers: list[OptimizerWrapper] = []
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self._callback_metrics: dict[str, Tensor] = {}
        self._logged_metrics: dict[str, Tensor] = {}
        self._progress_bar_metrics: dict[str, float | Tensor] = {}
        self._active_collector = None
        self._train_loader: PreparedLoader | None = None
        self._val_loaders: list[PreparedLoader] | None = None
        self._stage_loaders: dict[str, list[PreparedLoader]] = {}  # a validate/test/predict call's
        self._module_callbacks: list[Any] = []  # see _attach
        self._closure_optimizers: set[int] = set()  # see _configure_optimizers
        self._has_val = False
        self.num_training_batches: int | float = 0
        self.num_val_batches: list[int | float] = []
        self.num_sanity_val_batches: list[int | float] = []
        self.num_test_batches: list[int | float] = []
        self.num_predict_batches: list[int | float] = []
        self.val_check_batch: int | float = math.inf
        self._ddp_model: nn.Module | None = None
        self.fit_loop: FitLoop | None = None
        self.predict_loop: PredictionLoop | None = None  # during and after predict (what prediction writers read)
        self._fitted_batches_that_stepped = 0  # a finished fit's logger step, for validate/test after it
        self._val_loop: EvaluationLoop | None = None
        self._seed = int(os.environ.get("PL_GLOBAL_SEED", "0") or 0)
        self.ckpt_path: str | None = None  # the checkpoint this run started from
        # Called at step boundaries; True means "a node is about to go away: checkpoint now" (Ray preemption).
        self._preemption_probe = preemption_probe
        if self.config.deterministic:
            # As Lightning: True makes nondeterministic ops raise, "warn" makes them warn; cuBLAS needs a fixed
            # workspace and cuDNN must not benchmark for either to hold on a GPU.
            torch.use_deterministic_algorithms(True, warn_only=self.config.deterministic == "warn")
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
            torch.backends.cudnn.benchmark = False

    # ============================================================ properties
    @property
    def train_dataloader(self) -> Any:
        """This fit's training DataLoader (with the distributed sampler it runs with); None until set up."""
        return None if self._train_loader is None else self._train_loader.loader

    @property
    def val_dataloaders(self) -> Any:
        """The validation DataLoader of this fit or validate call (a list when there are several); None until set up."""
        return _as_given(self._stage_loaders.get("validate", self._val_loaders))

    @property
    def test_dataloaders(self) -> Any:
        return _as_given(self._stage_loaders.get("test"))

    @property
    def predict_dataloaders(self) -> Any:
        return _as_given(self._stage_loaders.get("predict"))

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def num_devices(self) -> int:
        return 1

    @property
    def node_rank(self) -> int:
        return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))

    @property
    def is_last_batch(self) -> bool:
        """True while the training loop runs the last batch of its epoch."""
        loop = self.fit_loop
        return loop is not None and loop.at_last_batch()

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, torch.cuda.device_count() if self.config.accelerator == "gpu" else 1))

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def model(self) -> LightningModule | None:
        return self.lightning_module

    @property
    def callback_metrics(self) -> dict[str, Tensor]:
        self._refresh_from_active()
        return self._callback_metrics

    @property
    def logged_metrics(self) -> dict[str, Tensor]:
        self._refresh_from_active()
        return self._logged_metrics

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        self._refresh_from_active()
        # Step values are kept as tensors (see MetricCollector.step_metrics); readers get floats, as in Lightning.
        return {k: float(v) for k, v in self._progress_bar_metrics.items()}

    def _refresh_from_active(self) -> None:
        # In one process, reading metrics is free, so values logged a moment ago show up at once (as in
        # Lightning). Across ranks a read must not start a collective, so only the loops' sync points publish.
        collector = self._active_collector
        if collector is None or self.strategy.is_distributed:
            return
        if self.state.stage is RunningStage.TRAINING and self.fit_loop is not None and self.fit_loop.position in (
            "epoch_end",
        ):
            callback, log, pbar = collector.epoch_metrics()
        elif collector.training:
            callback, log, pbar = collector.step_metrics()
        else:
            return
        self._callback_metrics.update(callback)
        self._logged_metrics.update(log)
        self._progress_bar_metrics.update(pbar)

    # Lightning's loop settings, read by callbacks and user code
    @property
    def max_epochs(self) -> int | None:
        epochs = self.config.effective_max_epochs
        return None if epochs == -1 and self.config.max_epochs is None else epochs

    @property
    def max_steps(self) -> int:
        return self.config.effective_max_steps

    @property
    def num_sanity_val_steps(self) -> int | float:
        steps = self.config.num_sanity_val_steps
        return math.inf if steps == -1 else steps  # -1: every validation batch, as Lightning reports it

    @property
    def min_epochs(self) -> int:
        return self.config.min_epochs or 0

    @property
    def min_steps(self) -> int | None:
        return self.config.min_steps

    @property
    def accumulate_grad_batches(self) -> int:
        return self.config.accumulate_grad_batches

    @property
    def gradient_clip_val(self) -> float | None:
        return self.config.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> str | None:
        return self.config.gradient_clip_algorithm

    @property
    def check_val_every_n_epoch(self) -> int | None:
        return self.config.check_val_every_n_epoch

    @property
    def val_check_interval(self) -> int | float:
        return self.config.val_check_interval

    @property
    def log_every_n_steps(self) -> int:
        return self.config.log_every_n_steps

    @property
    def fast_dev_run(self) -> int:
        return self.config.fast_dev_run

    @property
    def limit_train_batches(self) -> int | float:
        return self.config.limit_train_batches

    @property
    def limit_val_batches(self) -> int | float:
        return self.config.limit_val_batches

    @property
    def precision(self) -> str:
        return self.config.precision

    @property
    def default_root_dir(self) -> str:
        return self.config.default_root_dir

    @property
    def log_dir(self) -> str:
        return self.config.default_root_dir

    @property
    def default_checkpoint_dir(self) -> str:
        return os.path.join(self.config.default_root_dir, "checkpoints")

    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    @property
    def sanity_checking(self) -> bool:
        return self.state.stage is RunningStage.SANITY_CHECKING

    @property
    def training(self) -> bool:
        return self.state.stage is RunningStage.TRAINING

    @property
    def validating(self) -> bool:
        return self.state.stage is RunningStage.VALIDATING

    @property
    def testing(self) -> bool:
        return self.state.stage is RunningStage.TESTING

    @property
    def predicting(self) -> bool:
        return self.state.stage is RunningStage.PREDICTING

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        found = [cb for cb in self.callbacks if isinstance(cb, EarlyStopping)]
        return found[0] if found else None

    @property
    def fit_loop_batches_that_stepped(self) -> int:
        """Lightning's logger step: this fit's batches that ended with an optimizer step, or those of the fit before."""
        return self.fit_loop.batches_that_stepped if self.fit_loop is not None else self._fitted_batches_that_stepped

    def continue_from(self, current_epoch: int, global_step: int, batches_that_stepped: int) -> None:
        """Start where a finished fit (another Engine's) stopped, as one Lightning Trainer does across stages.

        validate/test after fit then see the fitted epoch and step, and log at the fit's last logger step.
        """
        self.current_epoch, self.global_step = current_epoch, global_step
        self._fitted_batches_that_stepped = batches_that_stepped

    @property
    def estimated_stepping_batches(self) -> int | float:
        """Optimizer steps the whole fit will take (for OneCycleLR and friends)."""
        self._ensure_train_loader()
        if self.max_steps != -1 and self.config.max_epochs in (None, -1):
            return self.max_steps
        batches = self.num_training_batches
        if batches == math.inf:
            return self.max_steps if self.max_steps != -1 else math.inf
        epochs = max(self.config.effective_max_epochs, 1)
        steps = math.ceil(batches / self.accumulate_grad_batches) * epochs
        return min(steps, self.max_steps) if self.max_steps != -1 else steps

    # ============================================================ entry points
    def fit(
        self,
        module: LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: LightningDataModule | None = None,
        ckpt: dict[str, Any] | str | None = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``module``; ``ckpt`` (a checkpoint dict or path) resumes exactly where it was saved.

        ``ckpt_path`` names where a ``ckpt`` dict came from, for error messages
        and so that ModelCheckpoint never deletes the file a run resumed from.
        """
        if isinstance(train_dataloaders, LightningDataModule):
            datamodule, train_dataloaders = train_dataloaders, None
        self._attach(module, datamodule, TrainerFn.FITTING)
        self._train_source = train_dataloaders
        self._val_source = val_dataloaders
        self._run(self._fit_impl, ckpt, ckpt_path)

    def validate(self, module, dataloaders=None, datamodule=None, ckpt=None, ckpt_path=None) -> list[dict[str, float]]:
        return self._evaluate(module, dataloaders, datamodule, ckpt, ckpt_path, testing=False)

    def test(self, module, dataloaders=None, datamodule=None, ckpt=None, ckpt_path=None) -> list[dict[str, float]]:
        return self._evaluate(module, dataloaders, datamodule, ckpt, ckpt_path, testing=True)

    def predict(
        self, module, dataloaders=None, datamodule=None, ckpt=None, ckpt_path=None, return_predictions: bool = True
    ) -> list[Any] | None:
        """Predictions per dataloader (a flat list of batch outputs when there is one dataloader).

        ``return_predictions=False`` keeps none (a prediction writer callback writes them) and returns None.
        """
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        self._attach(module, datamodule, TrainerFn.PREDICTING)
        self._eval_source = dataloaders
        return self._run(lambda checkpoint: self._predict_impl(checkpoint, return_predictions), ckpt, ckpt_path)

    def _evaluate(self, module, dataloaders, datamodule, ckpt, ckpt_path, testing: bool):
        if isinstance(dataloaders, LightningDataModule):
            datamodule, dataloaders = dataloaders, None
        self._attach(module, datamodule, TrainerFn.TESTING if testing else TrainerFn.VALIDATING)
        self._eval_source = dataloaders
        return self._run(lambda checkpoint: self._evaluate_impl(testing, checkpoint), ckpt, ckpt_path)

    # ============================================================== lifecycle
    def _attach(self, module: LightningModule, datamodule: LightningDataModule | None, fn: TrainerFn) -> None:
        if not isinstance(module, LightningModule):
            raise TypeError(
                f"trainer.{fn.value}() needs a runtime.LightningModule, got {type(module).__name__}; subclass "
                "`from runtime import LightningModule`"
            )
        self.lightning_module = module
        self.datamodule = datamodule
        self._train_source = self._val_source = self._eval_source = None
        self._train_loader = None
        self._val_loaders = None
        self._has_val = False
        module.trainer = self
        if datamodule is not None:
            datamodule.trainer = self
        self.state = TrainerState(fn=fn, status="running")
        self.should_stop = False
        self._callback_metrics, self._logged_metrics, self._progress_bar_metrics = {}, {}, {}
        given = self.callbacks
        self.callbacks = with_module_callbacks(given, module)
        check_unique_state_keys(self.callbacks)
        # configure_callbacks() builds these anew at every call: see _restore_module_callbacks.
        self._module_callbacks = [cb for cb in self.callbacks if not any(cb is g for g in given)]
        if fn is TrainerFn.FITTING and self.config.enable_checkpointing and not self.checkpoint_callbacks:
            self.callbacks.append(ModelCheckpoint())
        if not self.config.enable_checkpointing and self.checkpoint_callbacks:
            raise MisconfigurationError(
                "Trainer(enable_checkpointing=False) but a ModelCheckpoint callback was passed; remove one of them"
            )
        # Checkpointing runs last so that it sees what every other callback did in the same hook.
        self.callbacks = [cb for cb in self.callbacks if not isinstance(cb, ModelCheckpoint)] + [
            cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)
        ]
        self.hooks = HookRunner(self)
        self._autocast = self.precision_plugin._autocast_dtype is not None
        self._transfer_hooks, overridden = batch_transfer_hooks(module, datamodule)
        self._plain_transfer = (
            self.strategy.root_device.type == "cpu"
            and self.config.precision in ("32-true", "16-mixed", "bf16-mixed")
            and not overridden
        )
        self._wants_progress = getattr(self.metrics_sink, "wants_progress", True)

    def _run(self, impl, ckpt, ckpt_path: str | None = None):
        module = self.lightning_module
        stage = self.state.fn.value
        self.ckpt_path = ckpt if isinstance(ckpt, str) else ckpt_path  # known in setup, as in Lightning
        try:
            with self.strategy.rank_zero_first():
                if self.datamodule is not None:
                    self.datamodule.prepare_data()
                module.prepare_data()
            self.hooks.setup(stage)
            module.to(self.strategy.root_device)
            self.precision_plugin.convert_module(module)
            checkpoint = self._load(ckpt, ckpt_path)
            if checkpoint is not None and self.state.fn is not TrainerFn.FITTING:
                self._restore_module_callbacks(checkpoint)
            result = impl(checkpoint)
            self.hooks.teardown(stage)
            self.state.status = "finished"
            self.state.stage = None
            self.metrics_sink.finalize("finished")
            return result
        except BaseException as exc:
            self.state.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                self.hooks.on_exception(exc)
            finally:
                self.metrics_sink.finalize(self.state.status)
            raise
        finally:
            self._active_collector = None
            self._ddp_model = None
            module._collector = None

    def _restore_module_callbacks(self, checkpoint: dict[str, Any]) -> None:
        """An evaluated checkpoint's state for the callbacks configure_callbacks() returned anew, as Lightning
        restores every callback's (so a ModelCheckpoint of the module's still knows its best file). The Trainer's
        own keep theirs: test(ckpt_path="best") must not rewind the fit's ModelCheckpoint to the best epoch's view.
        """
        states = checkpoint.get("callbacks", {})
        for cb in self._module_callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])

    def _load(self, ckpt: dict[str, Any] | str | None, ckpt_path: str | None) -> dict[str, Any] | None:
        if ckpt is None:
            return None
        if isinstance(ckpt, str):
            checkpoint = load_checkpoint(ckpt)
            source = ckpt
        else:
            checkpoint, source = ckpt, ckpt_path or "<checkpoint dict>"
        required_keys(checkpoint, ["state_dict"], source)
        module = self.lightning_module
        module.on_load_checkpoint(checkpoint)
        check_state_dict_compatible(module.state_dict(), checkpoint["state_dict"], source)
        module.load_state_dict(checkpoint["state_dict"])
        self._ckpt_source = source
        return checkpoint

    # ------------------------------------------------------------------ fit
    def _fit_impl(self, checkpoint: dict[str, Any] | None) -> None:
        module = self.lightning_module
        self._check_module_for_fit()
        self._configure_optimizers()
        self._ddp_model = self.strategy.wrap(_StepDispatcher(module))
        self._takes_batch_idx = _accepts(module.training_step, "batch_idx", 2)
        self._step_fn = self._ddp_model if self.strategy.is_distributed else module.training_step
        self._automatic = AutomaticOptimization(self)
        self._manual = ManualOptimization(self)
        self.fit_loop = FitLoop(self)
        self._val_loop = EvaluationLoop(self, RunningStage.VALIDATING)
        if checkpoint is not None:
            self._hparams_for_loggers()  # a clash is an error even on resume, as in Lightning
            self._restore_training_state(checkpoint)  # the run's logs already hold its hparams
        else:
            self._log_hparams()
        self.hooks.on_fit_start()
        if checkpoint is None:
            self._run_sanity_check()
        # Dataloaders are requested here, after the sanity check, in Lightning's order: train, then val.
        self._ensure_train_loader()
        if self._val_loaders is None:
            self._setup_val_loaders()
        rng_after_restore = checkpoint.get("rng_states") if checkpoint is not None else None
        if rng_after_restore:
            restore_rng_state(rng_after_restore)
        self.state.stage = RunningStage.TRAINING
        self.fit_loop.run()
        self.state.stage = None
        self.hooks.on_fit_end()

    def _hparams_for_loggers(self) -> dict[str, Any] | None:
        """The module's hparams merged with the datamodule's, as Lightning gives its loggers (None: none to log)."""
        return hparams_for_loggers(self.lightning_module, self.datamodule) if self.loggers else None

    def _log_hparams(self) -> None:
        """Send the hparams to the loggers as a stage starts (fit, validate, test, predict), as Lightning does."""
        hparams = self._hparams_for_loggers()
        if hparams:
            self.metrics_sink.log_hyperparams(hparams)

    def _check_module_for_fit(self) -> None:
        module = self.lightning_module
        if type(module).training_step is LightningModule.training_step:
            raise MisconfigurationError(f"{type(module).__name__} has no training_step(batch, batch_idx); trainer.fit needs one")
        if not module.automatic_optimization:
            if self.config.accumulate_grad_batches != 1:
                raise MisconfigurationError(
                    f"Trainer(accumulate_grad_batches={self.config.accumulate_grad_batches}) only works with "
                    "automatic optimization; with manual optimization accumulate yourself (step every N batches)"
                )
            if self.config.gradient_clip_val:
                raise MisconfigurationError(
                    f"Trainer(gradient_clip_val={self.config.gradient_clip_val}) only works with automatic "
                    "optimization; call self.clip_gradients(opt, gradient_clip_val=...) in training_step instead"
                )

    def _configure_optimizers(self) -> None:
        module = self.lightning_module
        with self.hooks.scope("configure_optimizers"):
            conf = module.configure_optimizers()
        if conf is None:
            warnings.warn(
                "configure_optimizers() returned None: training runs training_step and backward but updates no "
                "weights (as in Lightning). Return an optimizer to train",
                stacklevel=2,
            )
        optimizers, schedulers, monitor = parse_optimizers(conf)
        if len(optimizers) > 1 and module.automatic_optimization:
            raise MisconfigurationError(
                f"configure_optimizers() returned {len(optimizers)} optimizers; several optimizers need manual "
                "optimization: set `self.automatic_optimization = False` and step them in training_step"
            )
        for optimizer in optimizers:
            self.precision_plugin.check_optimizer(optimizer)
        self.optimizers = optimizers
        self._optimizer_wrappers = [OptimizerWrapper(opt, self) for opt in optimizers]
        # LBFGS and the like call the closure themselves; every other optimizer steps after it has run.
        self._closure_optimizers = {id(opt) for opt in optimizers if requires_closure(opt)}
        self.lr_scheduler_configs = scheduler_configs(schedulers, monitor, optimizers, module.automatic_optimization)

    def _train_dataloader_source(self) -> Any:
        if self._train_source is not None:
            return self._train_source
        if self.datamodule is not None:
            return self.datamodule.train_dataloader()
        return self.lightning_module.train_dataloader()

    def _ensure_train_loader(self) -> None:
        if self._train_loader is not None:
            return
        loaders = as_loader_list(self._train_dataloader_source())
        if len(loaders) != 1:
            raise MisconfigurationError(
                f"fit needs exactly one training dataloader, got {len(loaders)}; combine datasets with "
                "torch.utils.data.ConcatDataset"
            )
        limit = self.config.fast_dev_run or self.config.limit_train_batches
        self._train_loader = self._prepare(loaders[0], "train", limit)
        self.num_training_batches = self._train_loader.num_batches
        self._compute_val_check_batch()

    def _compute_val_check_batch(self) -> None:
        interval = self.config.val_check_interval
        batches = self.num_training_batches
        if isinstance(interval, int) and not isinstance(interval, bool):
            if interval > batches and self.config.check_val_every_n_epoch is not None and self.config.limit_val_batches:
                raise MisconfigurationError(
                    f"val_check_interval={interval} is more than the {batches} training batches per epoch; use a "
                    "smaller value, check_val_every_n_epoch=None to count batches across epochs, or "
                    "limit_val_batches=0 to turn validation off"
                )
            self.val_check_batch = interval
        elif batches == math.inf:
            if interval != 1.0:
                raise MisconfigurationError(
                    f"val_check_interval={interval} is a fraction of an epoch, but the training dataloader has no "
                    "length; pass an int number of batches instead"
                )
            self.val_check_batch = math.inf
        else:
            self.val_check_batch = max(1, int(batches * interval))

    def _prepare(self, loader: Any, stage: str, limit: int | float, record_indices: bool = False) -> PreparedLoader:
        return prepare_loader(
            loader,
            stage=stage,
            world_size=self.world_size,
            rank=self.global_rank,
            use_distributed_sampler=self.config.use_distributed_sampler,
            limit=limit,
            record_indices=record_indices,
            seed=self._seed,
        )

    def _eval_sources(self, stage: str) -> list[Any]:
        module, dm = self.lightning_module, self.datamodule
        if stage == "val":
            if self._val_source is not None:
                return as_loader_list(self._val_source)
            return as_loader_list(dm.val_dataloader() if dm is not None else module.val_dataloader())
        if self._eval_source is not None:
            return as_loader_list(self._eval_source)
        if stage == "test":
            return as_loader_list(dm.test_dataloader() if dm is not None else module.test_dataloader())
        if stage == "predict":
            return as_loader_list(dm.predict_dataloader() if dm is not None else module.predict_dataloader())
        return as_loader_list(dm.val_dataloader() if dm is not None else module.val_dataloader())

    def _setup_val_loaders(self) -> None:
        limit = self.config.fast_dev_run or self.config.limit_val_batches
        if not self._validation_enabled():
            self._val_loaders, self.num_val_batches = [], []
        else:
            self._val_loaders = [self._prepare(dl, "val", limit) for dl in self._eval_sources("val")]
            self.num_val_batches = [p.num_batches for p in self._val_loaders]
        self._has_val = bool(self._val_loaders) and sum(self.num_val_batches) > 0

    def _validation_enabled(self) -> bool:
        module = self.lightning_module
        has_step = type(module).validation_step is not LightningModule.validation_step
        return has_step and (self.config.fast_dev_run or self.config.limit_val_batches) != 0

    def _run_sanity_check(self) -> None:
        steps = self.config.num_sanity_val_steps
        if not self._validation_enabled() or steps == 0 or self.config.fast_dev_run:
            return
        # The sanity check must not change training's random stream (data order, dropout), as in Lightning.
        rng = capture_rng_state()
        self.state.stage = RunningStage.SANITY_CHECKING
        self.hooks.on_sanity_check_start()
        self._setup_val_loaders()
        budgets = [b if steps == -1 else min(b, steps) for b in self.num_val_batches]
        self.num_sanity_val_batches = budgets
        if self._has_val:
            EvaluationLoop(self, RunningStage.VALIDATING).run(self._val_loaders, budgets)
        self.hooks.on_sanity_check_end()
        self.state.stage = RunningStage.TRAINING
        self._callback_metrics, self._logged_metrics, self._progress_bar_metrics = {}, {}, {}
        restore_rng_state(rng)

    def _run_validation(self) -> None:
        previous = self.state.stage
        self.state.stage = RunningStage.VALIDATING
        self._val_loop.run(self._val_loaders, self.num_val_batches)
        self.state.stage = previous

    # ------------------------------------------------------- eval & predict
    def _evaluate_impl(self, testing: bool, checkpoint: dict[str, Any] | None) -> list[dict[str, float]]:
        module = self.lightning_module
        stage = "test" if testing else "validate"
        step_hook = LightningModule.test_step if testing else LightningModule.validation_step
        if getattr(type(module), step_hook.__name__) is step_hook:
            raise MisconfigurationError(
                f"{type(module).__name__} has no {step_hook.__name__}(batch, batch_idx); trainer.{stage} needs one"
            )
        self._log_hparams()  # before the dataloaders are requested, as in Lightning
        # The epoch and step stay this trainer's own (a previous fit's, or 0) whatever checkpoint the weights came
        # from, as in Lightning.
        limit = self.config.fast_dev_run or (self.config.limit_test_batches if testing else self.config.limit_val_batches)
        loaders = [self._prepare(dl, "test" if testing else "val", limit) for dl in self._eval_sources(
            "test" if testing else "validate")]
        self._stage_loaders[stage] = loaders
        budgets = [p.num_batches for p in loaders]
        if testing:
            self.num_test_batches = budgets
        else:
            self.num_val_batches = budgets
        self.state.stage = RunningStage.TESTING if testing else RunningStage.VALIDATING
        loop = EvaluationLoop(self, self.state.stage)
        return loop.run(loaders, budgets)

    def _predict_impl(self, checkpoint: dict[str, Any] | None, return_predictions: bool) -> list[Any] | None:
        self._log_hparams()
        limit = self.config.fast_dev_run or self.config.limit_predict_batches
        loaders = [self._prepare(dl, "predict", limit, record_indices=True) for dl in self._eval_sources("predict")]
        self._stage_loaders["predict"] = loaders
        budgets = [p.num_batches for p in loaders]
        self.num_predict_batches = budgets
        self.state.stage = RunningStage.PREDICTING
        self.predict_loop = PredictionLoop(self, return_predictions)
        per_loader = self.predict_loop.run(loaders, budgets)
        if per_loader is None:
            return None
        return per_loader[0] if len(per_loader) == 1 else per_loader

    # ============================================================ step pieces
    def _gather_fn(self):
        return self.strategy.gather_packed if self.strategy.is_distributed else None

    def _prepare_batch(self, batch: Any, dataloader_idx: int) -> Any:
        if self._plain_transfer:
            # CPU, no dtype conversion, no transfer hooks: the batch is already where it must be.
            return batch
        before, transfer, after = self._transfer_hooks
        batch = self.precision_plugin.convert_input(batch)
        batch = before(batch, dataloader_idx)
        batch = transfer(batch, self.strategy.root_device, dataloader_idx)
        return after(batch, dataloader_idx)

    def _training_step(self, batch: Any, batch_idx: int) -> Any:
        args = (batch, batch_idx) if self._takes_batch_idx else (batch,)
        with self.hooks.scope("training_step"):
            try:
                if self._autocast:
                    with self.precision_plugin.forward_context():
                        return self._step_fn(*args)
                return self._step_fn(*args)
            except RuntimeError as err:
                if "Expected to have finished reduction in the prior iteration" not in str(err):
                    raise
                raise RuntimeError(
                    "DDP: the previous step's backward left some parameters without gradients (a network frozen "
                    "by toggle_optimizer, a branch the loss did not use). Pass "
                    "Trainer(strategy='ddp_find_unused_parameters_true'), as with Lightning, so DDP does not wait "
                    f"for them. PyTorch said: {str(err).splitlines()[0]}"
                ) from err

    def _eval_step(self, testing: bool, batch: Any, batch_idx: int, dataloader_idx: int | None) -> Any:
        module = self.lightning_module
        args: tuple = (batch, batch_idx) if dataloader_idx is None else (batch, batch_idx, dataloader_idx)
        fx = "test_step" if testing else "validation_step"
        with self.hooks.scope(fx), self.precision_plugin.forward_context():
            return module.test_step(*args) if testing else module.validation_step(*args)

    def _predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int | None) -> Any:
        args: tuple = (batch, batch_idx) if dataloader_idx is None else (batch, batch_idx, dataloader_idx)
        with self.precision_plugin.forward_context():
            return self.lightning_module.predict_step(*args)

    def _backward(self, loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        hooks = self.hooks
        if hooks.any_before_backward:
            hooks.on_before_backward(loss)
        scaled = self.precision_plugin.scale_loss(loss)
        if not self.lightning_module.automatic_optimization:
            # One DDP forward (training_step) may be followed by several manual backward passes.
            self.strategy.prepare_for_backward(scaled)
        if hooks.custom_backward:
            with hooks.scope("backward"):
                self.lightning_module.backward(scaled, *args, **kwargs)
        else:
            scaled.backward(*args, **kwargs)
        if hooks.any_after_backward:
            hooks.on_after_backward()

    def _zero_grad(self, optimizer: torch.optim.Optimizer, batch_idx: int) -> None:
        hooks = self.hooks
        if hooks.any_before_zero_grad:
            hooks.on_before_zero_grad(optimizer)
        if hooks.custom_zero_grad:
            hooks.optimizer_zero_grad(batch_idx, optimizer)
        else:
            optimizer.zero_grad()

    def _after_closure(self, optimizer: torch.optim.Optimizer) -> None:
        """Between backward and the step (gradients already unscaled): hooks, then clipping."""
        hooks = self.hooks
        if hooks.any_before_optimizer_step:
            hooks.on_before_optimizer_step(optimizer)
        if hooks.clips and self.lightning_module.automatic_optimization:
            hooks.configure_gradient_clipping(optimizer)

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Any, **kwargs: Any) -> Any:
        plugin = self.precision_plugin
        if closure is not None and id(optimizer) in self._closure_optimizers:
            result = plugin.closure_optimizer_step(optimizer, closure, self._after_closure, **kwargs)
        else:
            result = closure() if closure is not None else None
            # A skipped batch (training_step returned None) has no scaled gradients for the scaler to step with.
            skipped = plugin.scaler is not None and closure is not None and result is None
            if not (skipped and self.lightning_module.automatic_optimization):
                plugin.optimizer_step(optimizer, self._after_closure, **kwargs)
        self.global_step += 1
        return result

    def _check_finite_loss(self, loss: Tensor, batch_idx: int) -> None:
        if self.config.fail_on_nonfinite_loss and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(
                f"training_step returned a non-finite loss ({float(loss.detach())}) on rank {self.global_rank} at "
                f"epoch {self.current_epoch}, batch {batch_idx}, global step {self.global_step}; the run stopped "
                "before any later checkpoint was written (Trainer(fail_on_nonfinite_loss=True)). Lower the "
                "learning rate, clip gradients, or check the data"
            )

    def _update_schedulers(self, interval: str, batch_idx: int, plateau: bool) -> None:
        if not self.lr_scheduler_configs or not self.lightning_module.automatic_optimization:
            return
        for config in self.lr_scheduler_configs:
            if config.reduce_on_plateau != plateau or config.interval != interval:
                continue
            index = (batch_idx if interval == "step" else self.current_epoch) + 1
            if index % config.frequency != 0:
                continue
            metric = None
            if config.reduce_on_plateau:
                metric = self.callback_metrics.get(config.monitor)
                if metric is None:
                    if config.strict:
                        raise MisconfigurationError(
                            f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; logged metrics: "
                            f"{sorted(self._callback_metrics)}. Log it with self.log({config.monitor!r}, ...) or "
                            "change 'monitor' in configure_optimizers (or set 'strict': False to skip the update)"
                        )
                    warnings.warn(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged; skipping its update "
                        "(strict=False)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
            self.hooks.lr_scheduler_step(config.scheduler, metric)

    # ============================================================ sinks
    def _log_to_sink(self, metrics: dict[str, Tensor], step: int | None = None, add_epoch: bool = True) -> None:
        if not metrics:
            return
        self._logged_metrics.update(metrics)
        if not self.is_global_zero or not self._wants_metrics:
            return
        row = {k: float(v) for k, v in metrics.items()}
        if add_epoch:
            row.setdefault("epoch", float(self.current_epoch))
        if step is None:
            step = self.fit_loop_batches_that_stepped
        self.metrics_sink.log_metrics(row, step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send a row straight to the loggers (used by LearningRateMonitor)."""
        if self.is_global_zero and metrics and self._wants_metrics:
            self.metrics_sink.log_metrics(
                {k: float(v) for k, v in metrics.items()}, self.fit_loop_batches_that_stepped if step is None else step
            )

    def _report_progress(self, stage: RunningStage, done: int, total: int | float, metrics: dict[str, float]) -> None:
        if self._wants_progress and self.strategy.global_rank == 0:
            self.metrics_sink.progress(
                Progress(
                    stage=stage.value,
                    epoch=self.current_epoch,
                    batch_idx=done,
                    total=None if total == math.inf else int(total),
                    global_step=self.global_step,
                    metrics=metrics,
                )
            )

    # ============================================================ checkpoints
    def dump_checkpoint(self, weights_only: bool = False) -> dict[str, Any]:
        """The checkpoint dict as Lightning names its keys, plus what exact resume needs."""
        module = self.lightning_module
        checkpoint: dict[str, Any] = {
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "raylight_checkpoint_format": CHECKPOINT_FORMAT,
            "pytorch-lightning_version": LIGHTNING_CHECKPOINT_VERSION,
            "state_dict": module.state_dict(),
            "loops": {"fit_loop": self.fit_loop.state_dict()} if self.fit_loop is not None else {},
        }
        if not weights_only:
            checkpoint["callbacks"] = {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_dict()}
            checkpoint["optimizer_states"] = [opt.state_dict() for opt in self.optimizers]
            checkpoint["lr_schedulers"] = [config.scheduler.state_dict() for config in self.lr_scheduler_configs]
            if self.precision_plugin.scaler is not None:
                checkpoint["MixedPrecision"] = self.precision_plugin.state_dict()
            checkpoint["rng_states"] = capture_rng_state()
        if module.hparams:
            checkpoint["hyper_parameters"] = checkpointable_hparams(dict(module.hparams))
            name = getattr(module, "_hparams_name", "kwargs")
            if name is not None:
                checkpoint["hparams_name"] = name
        if self.datamodule is not None:
            checkpoint["datamodule"] = {type(self.datamodule).__qualname__: self.datamodule.state_dict()}
            if self.datamodule.hparams:
                checkpoint["datamodule_hyper_parameters"] = checkpointable_hparams(dict(self.datamodule.hparams))
        if not weights_only:
            for cb in self.callbacks:
                cb.on_save_checkpoint(self, module, checkpoint)
        module.on_save_checkpoint(checkpoint)
        return checkpoint

    def checkpoint_files_in(self, directory: str) -> list[str]:
        """The files already in ``directory`` where checkpoints are kept (the same answer on every rank).

        From then on ``checkpoint_exists`` knows them, and counts what this run saves and removes.
        """
        names = self.checkpoint_sink.listdir(directory) if self.is_global_zero else None
        paths = [os.path.join(directory, name) for name in self.strategy.broadcast(names)]
        self._checkpoint_files.update(paths)
        return paths

    def checkpoint_exists(self, filepath: str) -> bool:
        """Whether a file by that name is known to exist (ModelCheckpoint's version counter asks)."""
        return str(filepath) in self._checkpoint_files

    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        """Build the checkpoint on every rank; rank 0 commits it through the checkpoint sink."""
        self._checkpoint_files.add(str(filepath))
        checkpoint = self.dump_checkpoint(weights_only)
        if self.is_global_zero:
            # Rows logged before the checkpoint reach disk before it does, so a resume neither loses nor repeats them.
            flush = getattr(self.metrics_sink, "flush", None)
            if flush is not None:
                flush()
            self.checkpoint_sink.save(checkpoint, str(filepath))
        self.strategy.barrier()

    def _save_preemption_checkpoint(self) -> None:
        """A just-in-time checkpoint at a step boundary, written where ``ckpt_path="last"`` looks."""
        ckpt = self.checkpoint_callback
        if ckpt is not None and ckpt.last_model_path:
            self.save_checkpoint(ckpt.last_model_path)  # last-v1.ckpt where an earlier run's last.ckpt was kept
            return
        directory = ckpt.dirpath if ckpt is not None and ckpt.dirpath else self.default_checkpoint_dir
        self.save_checkpoint(os.path.join(directory, "last.ckpt"))

    def remove_checkpoint(self, filepath: str) -> None:
        self._checkpoint_files.discard(str(filepath))
        if self.is_global_zero:
            self.checkpoint_sink.remove(str(filepath))

    def _restore_training_state(self, checkpoint: dict[str, Any]) -> None:
        source = getattr(self, "_ckpt_source", "<checkpoint>")
        required_keys(checkpoint, ["optimizer_states", "loops"], source)
        if "raylight_checkpoint_format" not in checkpoint and "pytorch-lightning_version" in checkpoint:
            raise CheckpointError(
                f"{source} was written by Lightning {checkpoint['pytorch-lightning_version']}: its weights load, but "
                "its training-loop state has Lightning's layout, so raylight cannot resume training from it. Load "
                "the weights with YourModule.load_from_checkpoint(path) and start a new fit"
            )
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers):
            raise MisconfigurationError(
                f"checkpoint {source} holds {len(states)} optimizer states but configure_optimizers() returned "
                f"{len(self.optimizers)} optimizers; resume with the same optimizer setup"
            )
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
        sched_states = checkpoint.get("lr_schedulers", [])
        if len(sched_states) != len(self.lr_scheduler_configs):
            raise MisconfigurationError(
                f"checkpoint {source} holds {len(sched_states)} scheduler states but configure_optimizers() "
                f"returned {len(self.lr_scheduler_configs)} schedulers; resume with the same scheduler setup"
            )
        for config, state in zip(self.lr_scheduler_configs, sched_states):
            config.scheduler.load_state_dict(state)
        if "MixedPrecision" in checkpoint:
            self.precision_plugin.load_state_dict(checkpoint["MixedPrecision"])
        # Lightning's order: the datamodule's state, then every callback's on_load_checkpoint, then every
        # callback's own state.
        if self.datamodule is not None:
            dm_state = checkpoint.get("datamodule", {}).get(type(self.datamodule).__qualname__)
            if dm_state is not None:
                self.datamodule.load_state_dict(dm_state)
        for cb in self.callbacks:
            cb.on_load_checkpoint(self, self.lightning_module, checkpoint)
        callback_states = checkpoint.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key in callback_states:
                cb.load_state_dict(callback_states[cb.state_key])
        fit_state = checkpoint["loops"].get("fit_loop")
        if fit_state:
            self.fit_loop.load_state_dict(fit_state)
        else:
            self.current_epoch = int(checkpoint.get("epoch", 0))
            self.global_step = int(checkpoint.get("global_step", 0))


def _as_given(prepared: list[PreparedLoader] | None) -> Any:
    """The DataLoaders a loop runs, as Lightning's trainer returns them: one as itself, several as a list."""
    if prepared is None:
        return None
    loaders = [p.loader for p in prepared]
    return loaders[0] if len(loaders) == 1 else loaders


def with_module_callbacks(callbacks: list[Any], module: LightningModule) -> list[Any]:
    """``callbacks`` with those ``module.configure_callbacks()`` returns replacing the ones of their type, as in
    Lightning (a Ray run's driver applies the same rule to know whose states the workers sent back)."""
    extra = module.configure_callbacks() or []
    if not extra:
        return list(callbacks)
    extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
    kinds = {type(cb) for cb in extra}
    return [cb for cb in callbacks if type(cb) not in kinds] + extra
