"""Validation and test passes: step hooks under no_grad, epoch metrics per dataloader."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from runtime.logging.collector import MetricCollector
from runtime.loops.data import PreparedLoader
from runtime.loops.hooks import ModuleModes
from runtime.state import RunningStage

if TYPE_CHECKING:
    from runtime.engine import Engine


class EvaluationLoop:
    """Runs ``validation_step`` or ``test_step`` over one or more dataloaders."""

    def __init__(self, engine: "Engine", stage: RunningStage):
        self.engine = engine
        self.stage = stage
        self.collector = MetricCollector(engine._gather_fn(), training=False)
        self.logger_step = 0  # Lightning counts logged eval steps separately from training steps

    def run(self, loaders: list[PreparedLoader], max_batches: list[int | float]) -> list[dict[str, float]]:
        engine = self.engine
        module = engine.lightning_module
        testing = self.stage is RunningStage.TESTING
        hooks = engine.hooks
        self.collector.reset()
        self.collector.num_dataloaders = len(loaders)
        engine._active_collector = self.collector
        modes = ModuleModes(module)
        if testing:
            hooks.on_test_model_eval()
            hooks.on_test_start()
            hooks.on_test_epoch_start()
        else:
            hooks.on_validation_model_eval()
            hooks.on_validation_start()
            hooks.on_validation_epoch_start()

        per_loader_logged: list[dict[str, Any]] = []
        with torch.no_grad():
            for dl_idx, (prepared, budget) in enumerate(zip(loaders, max_batches)):
                dl_arg = dl_idx if len(loaders) > 1 else None
                step_logged: dict[str, Any] = {}
                batch_idx = -1
                if budget > 0:
                    prepared.set_epoch(engine.current_epoch)
                    for batch_idx, batch in enumerate(prepared.loader):
                        if batch_idx >= budget:
                            batch_idx -= 1
                            break
                        batch = engine._prepare_batch(batch, dl_idx)
                        self.collector.begin(None, batch, dl_arg)
                        if testing:
                            hooks.on_test_batch_start(batch, batch_idx, dl_idx, len(loaders))
                            output = engine._eval_step(testing, batch, batch_idx, dl_arg)
                            hooks.on_test_batch_end(output, batch, batch_idx, dl_idx, len(loaders))
                        else:
                            hooks.on_validation_batch_start(batch, batch_idx, dl_idx, len(loaders))
                            output = engine._eval_step(testing, batch, batch_idx, dl_arg)
                            hooks.on_validation_batch_end(output, batch, batch_idx, dl_idx, len(loaders))
                        self.collector.sync_step()
                        _, log, pbar = self.collector.step_metrics()
                        if pbar:  # the bar's step values stay in trainer.progress_bar_metrics, as in Lightning
                            engine._progress_bar_metrics.update(pbar)
                        if log and engine.sanity_checking:
                            engine._logged_metrics.update(log)  # the hooks may read them; the loggers get nothing
                        elif log:
                            step_logged.update(log)
                            engine._log_to_sink(log, step=self.logger_step)
                            self.logger_step += 1
                        engine._report_progress(self.stage if not engine.sanity_checking else RunningStage.SANITY_CHECKING, batch_idx + 1, budget, pbar)
                per_loader_logged.append(step_logged)

        self.collector.dataloader_idx = None
        # The epoch-end hooks read this pass's epoch values in trainer.callback_metrics, as in Lightning: what
        # the steps logged is reduced before them (one collective for every sync_dist value), and only what the
        # hooks log themselves is reduced after them.
        self._publish(*self.collector.epoch_metrics())
        if testing:
            hooks.on_test_epoch_end()
        else:
            hooks.on_validation_epoch_end()
        callback, log, pbar = self.collector.epoch_metrics()
        self.collector.reset_metrics()  # Lightning resets the Metrics logged in a pass when it ends
        self._publish(callback, log, pbar)
        results: list[dict[str, float]] = []
        if not engine.sanity_checking:
            engine._log_to_sink(log)
            origin = self.collector.epoch_keys_by_dataloader()
            for dl_idx in range(len(loaders)):
                # A metric belongs to the dataloader it was logged from; epoch-level hooks belong to all.
                row = {k: float(v) for k, v in log.items() if origin.get(k) in (None, dl_idx) or len(loaders) == 1}
                results.append(row)
        if testing:
            hooks.on_test_end()
            hooks.on_test_model_train(modes)
        else:
            hooks.on_validation_end()
            hooks.on_validation_model_train(modes)
        engine._active_collector = None
        return results

    def _publish(self, callback: dict[str, torch.Tensor], log: dict[str, torch.Tensor], pbar: dict[str, float]) -> None:
        # Also during the sanity check, where the hooks see its values too; the engine drops them after it.
        engine = self.engine
        engine._callback_metrics.update(callback)
        engine._logged_metrics.update(log)
        engine._progress_bar_metrics.update(pbar)
