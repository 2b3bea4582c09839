"""The training loop: epochs of batches, validation inside, exact mid-epoch resume.

Order per batch (Lightning's): transfer -> on_train_batch_start -> optimize
-> step-interval schedulers (and epoch-interval ones on the epoch's last
batch) -> on_train_batch_end -> log -> validation if due -> plateau
schedulers -> logger step counter. A loader without a length is read one
batch ahead (``LookAhead``), so that its epoch's last batch is known while it
runs; a sized one needs no look-ahead. Per epoch: on_train_epoch_start ->
batches -> on_train_epoch_end (callbacks, module, then checkpoint/early-stop
callbacks) -> plateau epoch schedulers -> epoch metrics logged.

Resume: a checkpoint records the position (``"batch_end"``: saved from
on_train_batch_end; ``"after_val"``: saved after validation in a batch tail;
``"epoch_end"``: saved from on_train_epoch_end) plus the RNG state at the
epoch's start, so the same batches are replayed in the same order.

The position is per rank (each rank skips its own shard's done batches), so
it also records the world size and the per-rank batch count it was saved
with. A checkpoint saved inside an epoch cannot be resumed on another world
size: the rest of the epoch was sharded for the old one, and re-sharding it
would repeat or drop samples, so that is refused. One saved after the
epoch's last batch resumes anywhere: only the epoch's tail remains.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from runtime.errors import WorldSizeChangedError
from runtime.logging.collector import MetricCollector
from runtime.loops.data import LookAhead, PreparedLoader
from runtime.seed import capture_rng_state, restore_rng_state
from runtime.state import RunningStage

if TYPE_CHECKING:
    from runtime.engine import Engine


class FitLoop:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.collector = MetricCollector(engine._gather_fn(), training=True)
        self.batches_that_stepped = 0  # Lightning's logger step: batches that ended with an optimizer step
        self.total_batch_idx = -1
        self.batch_idx = -1
        self.batches_done = 0  # batches of the current epoch that completed
        self._skipped_rest_of_epoch = False  # on_train_batch_start returned -1 in this epoch
        self.position = "epoch_start"
        self.epoch_start_rng: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self.skip_val_at_restore = False
        self.look_ahead: LookAhead | None = None  # this epoch's, when the loader has no length

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.engine.current_epoch,
            "position": self.position,
            "batches_done": self.batches_done,
            "batch_idx": self.batch_idx,
            "total_batch_idx": self.total_batch_idx,
            "batches_that_stepped": self.batches_that_stepped,
            "global_step": self.engine.global_step,
            "world_size": self.engine.world_size,
            "epoch_batches": self.engine.num_training_batches,  # per rank; a float inf when unknown
            "epoch_start_rng": self.epoch_start_rng if self.epoch_start_rng is not None else {},
            "train_metrics": self.collector.state_dict(),
            # Logger rows at or after this step were not yet written when the checkpoint was taken; a resumed
            # run drops any such rows a dead driver left behind and writes them again.
            "log_resume_step": self.batches_that_stepped + (1 if self.position == "after_val" else 0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_world_size(state)
        self._restored = state
        self.engine.current_epoch = int(state["epoch"])
        self.engine.global_step = int(state["global_step"])
        self.batches_that_stepped = int(state["batches_that_stepped"])
        self.total_batch_idx = int(state["total_batch_idx"])
        self.collector.load_state_dict(state.get("train_metrics", {}))

    def _check_world_size(self, state: dict[str, Any]) -> None:
        saved = state.get("world_size")  # absent in checkpoints from before it was recorded: trusted as before
        now = self.engine.world_size
        if saved is None or int(saved) == now or state["position"] == "epoch_end":
            return
        done, per_rank = int(state["batches_done"]), state.get("epoch_batches", math.inf)
        if done == 0 or done >= per_rank:
            return  # nothing of the epoch consumed yet, or all of it
        source = getattr(self.engine, "_ckpt_source", "the checkpoint")
        of_epoch = "" if per_rank == math.inf else f" of {per_rank}"
        raise WorldSizeChangedError(
            f"cannot resume from {source}: it was saved with world size {saved} at batch {done}{of_epoch} "
            f"(per rank) of epoch {state['epoch']}, and this run has world size {now}. The rest of that epoch "
            f"was split across {saved} ranks; splitting it across {now} would repeat or skip samples. Resume on "
            f"{saved} workers (num_workers={saved}), or resume from a checkpoint saved at the end of an epoch"
        )

    def _resumes_on_other_world_size(self, restored: dict[str, Any]) -> bool:
        saved = restored.get("world_size")
        return saved is not None and int(saved) != self.engine.world_size and int(restored["batches_done"]) > 0

    @contextmanager
    def _saved_epoch_budget(self, restored: dict[str, Any]) -> Iterator[None]:
        """The saved run's per-rank batch count, while the rest of its epoch runs on another world size.

        _check_world_size let the checkpoint through, so that run had done all of the epoch's batches: only
        the epoch's tail remains (logging, validation if due, epoch end), and it must see the epoch as that
        run did (the last batch is the last one), not as this world size shards it.
        """
        engine = self.engine
        budget = engine.num_training_batches
        engine.num_training_batches = restored["epoch_batches"]
        engine._compute_val_check_batch()
        try:
            yield
        finally:
            engine.num_training_batches = budget
            engine._compute_val_check_batch()

    # ----------------------------------------------------------- helpers
    def should_accumulate(self, batch_idx: int, is_last: bool) -> bool:
        return (batch_idx + 1) % self.engine.accumulate_grad_batches != 0 and not is_last

    def _max_steps_reached(self) -> bool:
        max_steps = self.engine.max_steps
        return max_steps != -1 and self.engine.global_step >= max_steps

    def _should_check_val_epoch(self) -> bool:
        every = self.engine.check_val_every_n_epoch
        return self.engine._has_val and (every is None or (self.engine.current_epoch + 1) % every == 0)

    def _should_check_val(self, batch_idx: int, is_last: bool) -> bool:
        engine = self.engine
        if not self._should_check_val_epoch():
            return False
        if engine.should_stop and self._can_stop_early():
            return True
        val_check_batch = engine.val_check_batch
        if val_check_batch == math.inf:
            return is_last
        current = self.total_batch_idx if engine.check_val_every_n_epoch is None else batch_idx
        return (current + 1) % val_check_batch == 0

    def _can_stop_early(self) -> bool:
        engine = self.engine
        # current_epoch counts the epochs completed so far, mid-epoch and after one ends alike.
        return engine.current_epoch >= engine.min_epochs and engine.global_step >= (engine.min_steps or 0)

    def _ran_to_the_epochs_end(self) -> bool:
        """Whether the epoch reached its last batch, or on_train_batch_start skipped the rest of it (Lightning
        updates plateau schedulers only then: not after max_steps or a stop request cut the epoch short)."""
        if self._skipped_rest_of_epoch:
            return True
        if self.look_ahead is not None:
            return self.look_ahead.done and self.batches_done == self.batch_idx + 1
        return self.batches_done >= self.engine.num_training_batches

    def at_last_batch(self) -> bool:
        """Whether the batch at ``batch_idx`` is its epoch's last (``trainer.is_last_batch``)."""
        if self.look_ahead is not None:
            return self.look_ahead.done
        return self.batch_idx + 1 >= self.engine.num_training_batches

    def _done(self) -> bool:
        engine = self.engine
        if self._max_steps_reached():
            return True
        max_epochs = engine.max_epochs
        if max_epochs is not None and max_epochs != -1 and engine.current_epoch >= max_epochs:
            return True
        if engine.should_stop and self._can_stop_early():
            return True
        return False

    # --------------------------------------------------------------- run
    def run(self) -> None:
        engine = self.engine
        hooks = engine.hooks
        _warn_about_eval_mode(engine.lightning_module)
        hooks.on_train_start()
        restored = self._restored
        self._restored = None
        if restored is not None and restored["position"] == "epoch_end":
            self._finish_epoch(resume_after_callbacks=True)
            restored = None
        while not self._done():
            if restored is not None and self._resumes_on_other_world_size(restored):
                with self._saved_epoch_budget(restored):
                    self._run_epoch(restored)
            else:
                self._run_epoch(restored)
            restored = None
        hooks.on_train_end()

    def _run_epoch(self, restored: dict[str, Any] | None) -> None:
        engine = self.engine
        hooks = engine.hooks
        module = engine.lightning_module
        prepared = engine._train_loader
        prepared.set_epoch(engine.current_epoch)
        engine._active_collector = self.collector
        budget = engine.num_training_batches

        skip = 0
        if restored is None:
            self.collector.reset()
            self.batches_done = 0
            self.batch_idx = -1
            self.position = "epoch_start"
            hooks.on_train_epoch_start()
            self.epoch_start_rng = capture_rng_state()
            iterator = self._epoch_batches(prepared, budget)
        else:
            # Replay the epoch's start: same RNG, same sampler permutation, then skip what was done.
            skip = int(restored["batches_done"])
            self.batches_done = skip
            self.batch_idx = int(restored["batch_idx"])
            self.epoch_start_rng = restored["epoch_start_rng"] or capture_rng_state()
            current_rng = capture_rng_state()
            restore_rng_state(self.epoch_start_rng)
            iterator = self._epoch_batches(prepared, budget, skip=skip)
            restore_rng_state(current_rng)
            self._finish_batch_tail(self.batch_idx, restored["position"], budget)

        batch_idx = skip - 1
        # Settings that cannot change inside an epoch, read once: this loop's own cost is per step.
        automatic = module.automatic_optimization
        accumulate = engine.accumulate_grad_batches
        collector = self.collector
        run_automatic, run_manual = engine._automatic.run, engine._manual.run
        has_schedulers = bool(engine.lr_scheduler_configs)
        probe = engine._preemption_probe
        distributed = engine.strategy.is_distributed
        any_batch_start, any_batch_end = hooks.any_train_batch_start, hooks.any_train_batch_end
        while not self._batch_loop_done(batch_idx, budget):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            batch_idx += 1
            self.batch_idx = batch_idx
            self.total_batch_idx += 1
            is_last = self.at_last_batch()
            batch = engine._prepare_batch(batch, 0)
            collector.new_batch(batch)
            if any_batch_start and hooks.on_train_batch_start(batch, batch_idx) == -1:
                self._skipped_rest_of_epoch = True  # ends the epoch as its last batch would, as in Lightning
                break
            should_accumulate = automatic and (batch_idx + 1) % accumulate != 0 and not is_last
            if automatic:
                outputs = run_automatic(batch, batch_idx, not should_accumulate)
            else:
                outputs = run_manual(batch, batch_idx)
            self.batches_done = batch_idx + 1
            if has_schedulers and not should_accumulate:
                engine._update_schedulers("step", batch_idx, plateau=False)
                if is_last:
                    engine._update_schedulers("epoch", batch_idx, plateau=False)
            published = None
            if distributed:
                # on_train_batch_end reads this step's values (their last reduction for sync_dist ones), as
                # in Lightning; in one process callback_metrics are read lazily instead.
                if self._step_values_due(batch_idx, is_last, should_accumulate):
                    collector.sync_step()
                published = self._publish_step_metrics()
            self.position = "batch_end"
            if any_batch_end:
                hooks.on_train_batch_end(outputs, batch, batch_idx)
                published = None  # it may have logged: the tail reduces and publishes again
            self._finish_batch_tail(
                batch_idx, "batch_end", budget, should_accumulate=should_accumulate, is_last=is_last, published=published
            )
            if probe is not None and probe():
                # A node is about to be preempted: commit a checkpoint now; the run continues, and resumes
                # from it on the remaining or replacement nodes.
                engine._save_preemption_checkpoint()
        del iterator
        if self.look_ahead is not None:
            self.look_ahead.close()  # the loader's iterator ends here (its workers too), as it does without a look-ahead
        self._finish_epoch(resume_after_callbacks=False)

    def _epoch_batches(self, prepared: PreparedLoader, budget: int | float, skip: int = 0) -> Iterator[Any]:
        """The epoch's batches after the first ``skip`` (a resumed epoch's), one ahead when their number is unknown.

        A resumed epoch fetches its look-ahead batch here too, under the epoch's starting RNG state as the
        skipped batches were, so that the batch the interrupted run had fetched is fetched again.
        """
        if prepared.resumable is not None:
            prepared.resumable.skip = skip
            iterator = iter(prepared.loader)
            if prepared.resumable.current is not None:
                # The sampler draws its permutation now, under the RNG state the caller set (a fresh epoch
                # draws it at its first batch otherwise, from the same state: nothing runs in between).
                prepared.resumable.current.materialize()
        else:
            iterator = iter(prepared.loader)
            for _ in range(skip):
                next(iterator, None)
        self.look_ahead = None
        if budget == math.inf:
            strategy = self.engine.strategy
            agree = strategy.reduce_boolean_decision if strategy.is_distributed else None
            iterator = self.look_ahead = LookAhead(iterator, agree, resumed=skip > 0)
        return iterator

    def _logger_step_due(self) -> bool:
        """Whether the logger writes this optimizer step's values (``log_every_n_steps``)."""
        config = self.engine.config
        log_every = config.log_every_n_steps
        return bool(config.fast_dev_run) or (
            log_every > 0 and ((self.batches_that_stepped + 1) % log_every == 0 or self.engine.should_stop)
        )

    def _step_values_due(self, batch_idx: int, is_last: bool, should_accumulate: bool) -> bool:
        """Whether a distributed run reduces this step's ``sync_dist`` values before ``on_train_batch_end``.

        A reduction is a collective that both ranks wait for (~2 ms on 2 CPU processes), so step values are
        reduced where something reads them: the logger's steps, the epoch's last step, before validation
        and where a ``ModelCheckpoint`` saves on a step schedule; in between, ``callback_metrics`` and the
        progress bar keep each value's last reduction. Every rank decides the same, from counters alone.
        """
        if is_last or self._max_steps_reached() or self._should_check_val(batch_idx, is_last):
            return True
        if should_accumulate:
            return False
        engine = self.engine
        return self._logger_step_due() or any(cb.saves_after_step(engine.global_step) for cb in engine.checkpoint_callbacks)

    def _batch_loop_done(self, batch_idx: int, budget: int | float) -> bool:
        return batch_idx + 1 >= budget or self._max_steps_reached() or (
            self.engine.should_stop and self._can_stop_early()
        )

    def _finish_batch_tail(
        self,
        batch_idx: int,
        position: str,
        budget: int | float,
        should_accumulate: bool | None = None,
        is_last: bool | None = None,
        published: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Everything after on_train_batch_end: log, validate if due, plateau schedulers, counters.

        ``published``: the logger's part of this step's values, when they were already reduced and published
        and nothing has logged since (a distributed step without an on_train_batch_end hook).
        """
        engine = self.engine
        module = engine.lightning_module
        if is_last is None:
            is_last = self.at_last_batch()
        if should_accumulate is None:
            should_accumulate = module.automatic_optimization and self.should_accumulate(batch_idx, is_last)
        if position == "batch_end":
            distributed = engine.strategy.is_distributed
            log_now = not should_accumulate and self._logger_step_due()
            check_val = self._should_check_val(batch_idx, is_last)
            if published is None and distributed and (log_now or check_val):
                self.collector.sync_step()  # only what on_train_batch_end logged can still be pending
            # In one process callback_metrics are read lazily, except by validation's callbacks (EarlyStopping or
            # ModelCheckpoint monitoring a training value), which run after the training collector is put away;
            # across ranks every step publishes its values (sync_dist ones as of their last reduction) so that
            # all ranks see the same ones.
            if log_now or engine._wants_progress or distributed or check_val:
                log = published if published is not None else self._publish_step_metrics()
                if log and log_now:
                    engine._log_to_sink(log, step=self.batches_that_stepped)
                if engine._wants_progress:
                    engine._report_progress(RunningStage.TRAINING, batch_idx + 1, budget, engine._progress_bar_metrics)
            if check_val:
                if not should_accumulate:
                    module.on_validation_model_zero_grad()
                engine._active_collector = None
                # A checkpoint written during this validation resumes after it, not before.
                self.position = "after_val"
                engine._run_validation()  # which leaves every submodule in the mode it found it in
                engine._active_collector = self.collector
                self._report_training_progress(batch_idx + 1, budget)
            position = "after_val"
        if position == "after_val":
            self.position = "after_val"
            if not should_accumulate:
                engine._update_schedulers("step", batch_idx, plateau=True)
                self.batches_that_stepped += 1
        self.position = "batch_done"

    def _finish_epoch(self, resume_after_callbacks: bool) -> None:
        engine = self.engine
        hooks = engine.hooks
        engine._active_collector = self.collector
        if not resume_after_callbacks:
            self.collector.sync_step()  # pending when the loop stopped early (should_stop)
            self._publish_step_metrics()  # the last step's values, published once
            self.position = "epoch_end"
            # Epoch values of everything logged so far are reduced before the epoch-end hooks read them.
            self.collector.compute_epoch()
            self._publish_epoch_metrics()
            hooks.on_train_epoch_end(monitoring=False)
            hooks.on_train_epoch_end(monitoring=None)
            self._publish_epoch_metrics()
            hooks.on_train_epoch_end(monitoring=True)
        callback, log, pbar = self._publish_epoch_metrics()
        self._report_training_progress(self.batches_done, engine.num_training_batches)
        if self._ran_to_the_epochs_end():
            engine._update_schedulers("epoch", self.batch_idx, plateau=True)
        self._skipped_rest_of_epoch = False
        engine._log_to_sink(log, step=max(self.batches_that_stepped - 1, 0))
        engine._active_collector = None
        self.collector.reset()
        engine.current_epoch += 1
        self.position = "epoch_start"
        self.batches_done = 0

    def _report_training_progress(self, done: int, budget: int | float) -> None:
        """The training bar's metrics after a validation and at the epoch's end (Lightning refreshes them there).

        A copy: a per-batch update may have left for the driver (Ray) with the values from before.
        """
        engine = self.engine
        if engine._wants_progress:
            engine._report_progress(RunningStage.TRAINING, done, budget, dict(engine._progress_bar_metrics))

    def _publish_step_metrics(self) -> dict[str, torch.Tensor]:
        """Publish the current step's values to the engine's metric dicts; returns the logger's part."""
        callback, log, pbar = self.collector.step_metrics()
        engine = self.engine
        engine._callback_metrics.update(callback)
        engine._logged_metrics.update(log)
        engine._progress_bar_metrics.update(pbar)
        return log

    def _publish_epoch_metrics(self):
        callback, log, pbar = self.collector.epoch_metrics()
        engine = self.engine
        engine._callback_metrics.update(callback)
        engine._logged_metrics.update(log)
        engine._progress_bar_metrics.update(pbar)
        return callback, log, pbar


def _warn_about_eval_mode(module: Any) -> None:
    """Training keeps each submodule's mode, as Lightning does; say so when some are in eval mode."""
    in_eval = [name or type(module).__name__ for name, m in module.named_modules() if not m.training]
    if in_eval:
        warnings.warn(
            f"{len(in_eval)} module(s) are in eval mode as training starts ({', '.join(in_eval[:5])}"
            f"{', ...' if len(in_eval) > 5 else ''}): they train that way (dropout off, batch-norm statistics "
            "frozen), as in Lightning. Call model.train() before fit() if that is not what you meant",
            stacklevel=2,
        )
