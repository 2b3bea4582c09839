"""ModelCheckpoint: save checkpoints during fit and keep the best ``k`` by a monitored metric.

Bookkeeping (which files are best) lives in memory on every rank: the
checkpoint files may be written on another machine (the driver), so this
callback never opens them. Every rank calls ``trainer.save_checkpoint`` and
``trainer.remove_checkpoint``, and asks ``trainer.checkpoint_exists`` whether a
name is taken; the trainer decides which rank touches files.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import PurePath
from typing import Any

import torch
from torch import Tensor

from runtime.callbacks.base import Callback
from runtime.errors import MisconfigurationError
from runtime.state import TrainerFn

log = logging.getLogger(__name__)

# ``{name}`` or ``{name:spec}``; the name may contain "/" or "." (metric names often do).
_TEMPLATE_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


class ModelCheckpoint(Callback):
    """Save the model during ``fit`` and track the best checkpoints by ``monitor``.

    When it saves:

    * every ``every_n_train_steps`` optimizer steps, in ``on_train_batch_end``;
    * every ``every_n_epochs`` epochs (the default is every epoch when no
      trigger is given), either in ``on_train_epoch_end`` or in
      ``on_validation_end`` -- see ``save_on_train_epoch_end``;
    * ``last.ckpt`` (``save_last=True``) whenever one of the above saved, and
      once in ``on_train_end`` if nothing was saved before.

    Nothing is saved during the sanity check, with ``fast_dev_run``, outside
    ``fit``, or twice at the same ``global_step``.

    Args:
        dirpath: directory for the files, a relative one resolved against the
            current directory when the callback is built (as in Lightning);
            ``None`` uses the trainer's ``default_checkpoint_dir`` (resolved in
            ``setup``).
        filename: template such as ``"{epoch}-{val_loss:.2f}"``; ``None`` means
            ``"{epoch}-{step}"``. With ``auto_insert_metric_name`` each field
            becomes ``name=value`` (``epoch=1-step=20``). A name with ``/`` in
            it makes sub-folders unless you write the name yourself and set
            ``auto_insert_metric_name=False``.
        monitor: metric in ``trainer.callback_metrics`` to rank by; ``None``
            keeps only the latest checkpoint (or all, with ``save_top_k=-1``).
        save_top_k: keep the best ``k``; ``-1`` keeps all, ``0`` saves none
            (``save_last`` still works).
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        save_last: also write ``last.ckpt`` each time a checkpoint is saved.
        save_weights_only: save only the model's ``state_dict``.
        every_n_train_steps, every_n_epochs: triggers; at most one may be set.
        train_time_interval: not supported; must be ``None``.
        save_on_train_epoch_end: ``True`` saves at train-epoch end, ``False``
            after validation, ``None`` decides from the trainer's validation
            schedule.
        enable_version_counter: when a name is taken by a checkpoint this
            callback wrote, append ``-v1``, ``-v2``, ... instead of overwriting.
    """

    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | None = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: Any = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
    ) -> None:
        if save_last not in (None, True, False):
            raise MisconfigurationError(
                f"ModelCheckpoint(save_last={save_last!r}) is not supported: use True, False or None. "
                "('link' needs the checkpoint directory on this machine, which raylight does not assume.)"
            )
        if train_time_interval is not None:
            raise MisconfigurationError(
                f"ModelCheckpoint(train_time_interval={train_time_interval!r}) is not supported: pass None and "
                "use every_n_train_steps or every_n_epochs instead."
            )
        if mode not in ("min", "max"):
            raise MisconfigurationError(f"ModelCheckpoint(mode={mode!r}) is invalid: use 'min' or 'max'.")

        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        # Resolved here, as Lightning does: on Ray the workers run in a directory of their own, so a relative
        # path must mean the one the user saw where the callback was built.
        self.dirpath: str | None = os.path.realpath(os.path.expanduser(dirpath)) if dirpath is not None else None
        self.filename = filename
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._enable_version_counter = enable_version_counter
        self._train_time_interval = None

        # No trigger given means "every epoch"; any trigger given turns the others off.
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs, every_n_train_steps = 1, 0
        self._every_n_epochs: int = every_n_epochs or 0
        self._every_n_train_steps: int = every_n_train_steps or 0
        self._validate_configuration()

        self.current_score: Tensor | None = None
        self.best_k_models: dict[str, Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value: Tensor = torch.tensor(float("inf") if mode == "min" else float("-inf"))
        self.best_model_score: Tensor | None = None
        self.best_model_path = ""
        self.last_model_path = ""

        # Step 0 means "nothing trained yet": never worth a checkpoint.
        self._last_global_step_saved = 0
        self._last_checkpoint_saved = ""
        # A step-triggered save whose metric only validation produces waits for on_validation_end.
        self._defer_save_until_validation = False
        self._validation_has_run = False
        self._warned: set[str] = set()

    def _validate_configuration(self) -> None:
        if self.save_top_k < -1:
            raise MisconfigurationError(
                f"ModelCheckpoint(save_top_k={self.save_top_k}) is invalid: it must be -1 or more."
            )
        if self._every_n_train_steps < 0:
            raise MisconfigurationError(
                f"ModelCheckpoint(every_n_train_steps={self._every_n_train_steps}) is invalid: it must be 0 or more."
            )
        if self._every_n_epochs < 0:
            raise MisconfigurationError(
                f"ModelCheckpoint(every_n_epochs={self._every_n_epochs}) is invalid: it must be 0 or more."
            )
        if self._every_n_train_steps >= 1 and self._every_n_epochs >= 1:
            raise MisconfigurationError(
                f"ModelCheckpoint(every_n_train_steps={self._every_n_train_steps}, "
                f"every_n_epochs={self._every_n_epochs}): set only one of them; use two ModelCheckpoint "
                "callbacks to save on both schedules."
            )
        if self.monitor is None and self.save_top_k not in (-1, 0, 1):
            raise MisconfigurationError(
                f"ModelCheckpoint(save_top_k={self.save_top_k}, monitor=None) cannot rank checkpoints without a "
                "metric: set monitor='<logged metric>' or use save_top_k=1 (latest only), -1 (all) or 0 (none)."
            )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs,
            train_time_interval=self._train_time_interval,
        )

    @property
    def every_n_epochs(self) -> int:
        return self._every_n_epochs

    # -- hooks

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Resolve the directory once, from rank 0, so every rank names the same files."""
        dirpath = self.dirpath if self.dirpath is not None else trainer.default_checkpoint_dir
        self.dirpath = trainer.strategy.broadcast(dirpath, src=0)
        if stage != TrainerFn.FITTING:
            return
        # Files already there (an earlier run's, another ModelCheckpoint's) keep their names: a new checkpoint
        # whose name is taken gets a version suffix instead of replacing them.
        existing = [p for p in trainer.checkpoint_files_in(self.dirpath) if not os.path.basename(p).startswith(".")]
        if existing and self.save_top_k != 0 and getattr(trainer, "ckpt_path", None) is None:
            self._warn_once(
                f"ModelCheckpoint: {self.dirpath} already holds {len(existing)} file(s), e.g. "
                f"{os.path.basename(sorted(existing)[0])!r}; a checkpoint whose name is taken is saved with a "
                f"version suffix ({self.CHECKPOINT_JOIN_CHAR}v1, ...) instead of replacing it. Give this run its "
                "own dirpath (or run_name) to keep runs apart"
            )

    def saves_after_step(self, global_step: int) -> bool:
        """Whether ``on_train_batch_end`` tries to save at ``global_step`` (``every_n_train_steps``)."""
        return self._every_n_train_steps >= 1 and global_step % self._every_n_train_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Save every ``every_n_train_steps`` optimizer steps."""
        if not self.saves_after_step(trainer.global_step):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and (self.monitor not in candidates or self._validation_follows(trainer, batch_idx)):
            # Not logged yet, or about to be replaced by the validation that follows this batch (the previous
            # one's value would rank this checkpoint): save after that validation, as Lightning does.
            self._defer_save_until_validation = True
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _validation_follows(self, trainer, batch_idx: int) -> bool:
        """Whether this is the epoch's last batch, a validation runs after it, and this callback saves after that."""
        if batch_idx + 1 < trainer.num_training_batches or self._should_save_on_train_epoch_end(trainer):
            return False
        every = trainer.check_val_every_n_epoch
        return sum(trainer.num_val_batches) > 0 and (every is None or (trainer.current_epoch + 1) % every == 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Save every ``every_n_epochs`` epochs when saving at train-epoch end."""
        if self._should_skip_saving_checkpoint(trainer) or not self._should_save_on_train_epoch_end(trainer):
            return
        self._save_on_epoch_schedule(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Save every ``every_n_epochs`` epochs (or a deferred step save) when saving after validation."""
        if not trainer.sanity_checking and sum(trainer.num_val_batches) > 0:
            self._validation_has_run = True
        if self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer):
            return
        if self._defer_save_until_validation:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            self._defer_save_until_validation = False
            return
        self._save_on_epoch_schedule(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        """Make sure ``save_last=True`` leaves a ``last`` checkpoint even if no trigger fired."""
        if not self.save_last or self._last_checkpoint_saved:
            return
        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "dirpath": self.dirpath,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dirpath = state_dict.get("dirpath", self.dirpath)
        # Before setup the directory is not known yet; trust the checkpoint's.
        if self.dirpath is None or self.dirpath == saved_dirpath:
            self.best_model_score = state_dict["best_model_score"]
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            self.best_k_models = dict(state_dict.get("best_k_models", self.best_k_models))
            self.last_model_path = state_dict.get("last_model_path", self.last_model_path)
            self.current_score = state_dict.get("current_score", self.current_score)
        else:
            warnings.warn(
                f"ModelCheckpoint: the checkpoint was written with dirpath={saved_dirpath!r} but this run uses "
                f"dirpath={self.dirpath!r}; only best_model_path is restored (best_k_models, best_model_score, "
                "kth_best_model_path, kth_value and last_model_path start fresh).",
                stacklevel=2,
            )
        self.best_model_path = state_dict["best_model_path"]

    # -- when to save

    def _should_skip_saving_checkpoint(self, trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_global_step_saved == trainer.global_step
        )

    def _should_save_on_train_epoch_end(self, trainer) -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        # Validation skips some epochs: train-epoch end would save without fresh metrics.
        if trainer.check_val_every_n_epoch != 1:
            return False
        if sum(trainer.num_val_batches) == 0:
            return True
        # Several validations per epoch: save after each of them instead.
        return trainer.val_check_interval == 1.0

    def _save_on_epoch_schedule(self, trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        # "last" follows a real save at this step, it is not a trigger of its own.
        if self._last_global_step_saved == trainer.global_step:
            self._save_last_checkpoint(trainer, candidates)

    # -- what to save

    def _monitor_candidates(self, trainer) -> dict[str, Tensor]:
        candidates = {name: _as_tensor(value) for name, value in trainer.callback_metrics.items()}
        # self.log("epoch", ...) arrives as a float; file names want an int.
        epoch, step = candidates.get("epoch"), candidates.get("step")
        candidates["epoch"] = epoch.int() if epoch is not None else torch.tensor(trainer.current_epoch)
        candidates["step"] = step.int() if step is not None else torch.tensor(trainer.global_step)
        return candidates

    def _save_topk_checkpoint(self, trainer, candidates: dict[str, Tensor]) -> None:
        if self.save_top_k == 0:
            return
        if self.monitor is None:
            self._save_none_monitor_checkpoint(trainer, candidates)
            return
        if self.monitor not in candidates:
            message = (
                f"ModelCheckpoint(monitor={self.monitor!r}) found no metric named {self.monitor!r} in "
                f"trainer.callback_metrics. Available metrics: {sorted(candidates)}. Log it with "
                f"self.log({self.monitor!r}, value) in your LightningModule, or set monitor to one of the "
                "available names."
            )
            if self._validation_has_run:
                raise MisconfigurationError(message)
            # Validation may simply not have produced it yet.
            self._warn_once(message)
            return
        current = candidates[self.monitor]
        if self._is_top_k(trainer, current):
            self._update_best_and_save(trainer, current, candidates)
        elif self.verbose and trainer.is_global_zero:
            log.info(
                "Epoch %d, global step %d: %r was not in top %d",
                int(candidates["epoch"]), int(candidates["step"]), self.monitor, self.save_top_k,
            )

    def _is_top_k(self, trainer, current: Tensor) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        better = torch.lt if self.mode == "min" else torch.gt
        improves = bool(better(current, self.best_k_models[self.kth_best_model_path]))
        # Ranks may see different unsynced metrics; they must agree or the save collective hangs.
        return trainer.strategy.reduce_boolean_decision(improves)

    def _update_best_and_save(self, trainer, current: Tensor, candidates: dict[str, Tensor]) -> None:
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        evicted = None
        if len(self.best_k_models) == k:
            evicted = self.kth_best_model_path
            self.best_k_models.pop(evicted)

        # A NaN would break the ordering; rank it as the worst possible score.
        if torch.isnan(current):
            current = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))

        filepath = self._unique_filepath(trainer, candidates, reusable=evicted)
        self.current_score = current
        self.best_k_models[filepath] = current
        if len(self.best_k_models) == k:
            worst = max if self.mode == "min" else min
            self.kth_best_model_path = worst(self.best_k_models, key=lambda p: self.best_k_models[p].item())
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        best = min if self.mode == "min" else max
        self.best_model_path = best(self.best_k_models, key=lambda p: self.best_k_models[p].item())
        self.best_model_score = self.best_k_models[self.best_model_path]

        if self.verbose and trainer.is_global_zero:
            log.info(
                "Epoch %d, global step %d: %r reached %.5f (best %.5f), saving model to %r as top %d",
                int(candidates["epoch"]), int(candidates["step"]), self.monitor, float(current),
                float(self.best_model_score), filepath, k,
            )
        self._save_checkpoint(trainer, filepath)
        if evicted and self._should_remove_checkpoint(trainer, evicted, filepath):
            self._remove_checkpoint(trainer, evicted)

    def _save_none_monitor_checkpoint(self, trainer, candidates: dict[str, Tensor]) -> None:
        filepath = self._unique_filepath(trainer, candidates, reusable=self.best_model_path)
        # Set before saving: the path is part of the state written into this checkpoint.
        previous, self.best_model_path = self.best_model_path, filepath
        self._save_checkpoint(trainer, filepath)
        if self.save_top_k == 1 and previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)

    def _save_last_checkpoint(self, trainer, candidates: dict[str, Tensor]) -> None:
        if not self.save_last:
            return
        filepath = self._unique_filepath(
            trainer, candidates, template=self.CHECKPOINT_NAME_LAST, reusable=self.last_model_path
        )
        previous, self.last_model_path = self.last_model_path, filepath
        self._save_checkpoint(trainer, filepath)
        if previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        trainer.save_checkpoint(filepath, weights_only=self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        trainer.remove_checkpoint(filepath)

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        """Only delete files this callback owns: in its directory and not the one training resumed from."""
        if previous == current:
            return False
        resumed_from = getattr(trainer, "ckpt_path", None)
        if resumed_from is not None and os.path.normpath(previous) == os.path.normpath(os.fspath(resumed_from)):
            return False
        if self.dirpath is None:
            return True
        return PurePath(os.path.normpath(self.dirpath)) in PurePath(os.path.normpath(previous)).parents

    # -- file names

    def _unique_filepath(
        self, trainer, candidates: dict[str, Tensor], template: str | None = None, reusable: str | None = None
    ) -> str:
        """Format the name; if a file already has it (and it is not ``reusable``), add ``-v1``, ``-v2``, ..."""
        filepath = self.format_checkpoint_name(candidates, template)
        if not self._enable_version_counter:
            return filepath
        version = self.STARTING_VERSION
        while filepath != reusable and trainer.checkpoint_exists(filepath):
            filepath = self.format_checkpoint_name(candidates, template, ver=version)
            version += 1
        return filepath

    def format_checkpoint_name(
        self,
        metrics: dict[str, Any],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        """Fill the filename template from ``metrics`` and return the full path.

        ``{name}`` / ``{name:spec}`` fields are formatted with the metric's
        value (``0`` for a metric that is missing); with
        ``auto_insert_metric_name`` each becomes ``name=value``.
        ``format_checkpoint_name({"epoch": 2, "val_loss": 0.1234})`` with
        ``filename="{epoch}-{val_loss:.2f}"`` gives ``<dirpath>/epoch=2-val_loss=0.12.ckpt``.
        """
        template = filename or self.filename or ("{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}")

        def fill(match: re.Match) -> str:
            name, spec = match.group(1), match.group(2) or ""
            value = metrics.get(name, 0)
            if isinstance(value, Tensor):
                value = value.item()
            text = format(value, spec)
            return f"{name}{self.CHECKPOINT_EQUALS_CHAR}{text}" if self.auto_insert_metric_name else text

        name = _TEMPLATE_FIELD.sub(fill, template)
        if prefix is not None:
            name = self.CHECKPOINT_JOIN_CHAR.join([prefix, name])
        if ver is not None:
            name = self.CHECKPOINT_JOIN_CHAR.join([name, f"v{ver}"])
        name += self.FILE_EXTENSION
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)


def _as_tensor(value: Any) -> Tensor:
    # Scores are kept on the CPU so checkpoints load on a machine without the training device.
    return value.detach().cpu().clone() if isinstance(value, Tensor) else torch.tensor(value)
