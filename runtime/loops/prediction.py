"""The predict pass, and putting distributed predictions back in dataset order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from runtime.callbacks.prediction_writer import BasePredictionWriter
from runtime.loops.data import PreparedLoader
from runtime.loops.hooks import ModuleModes
from runtime.state import RunningStage

if TYPE_CHECKING:
    from runtime.engine import Engine


def _split_samples(prediction: Any, size: int) -> list[Any] | None:
    """Per-sample pieces of a batch prediction, or None when it cannot be split by its first dimension."""
    if isinstance(prediction, Tensor):
        return list(prediction.unbind(0)) if prediction.ndim > 0 and prediction.shape[0] == size else None
    if isinstance(prediction, dict):
        parts = {k: _split_samples(v, size) for k, v in prediction.items()}
        if any(p is None for p in parts.values()):
            return None
        return [{k: parts[k][i] for k in parts} for i in range(size)]
    if isinstance(prediction, (list, tuple)) and len(prediction) == size and not any(map(_is_collection, prediction)):
        return list(prediction)  # one plain value per sample: ``preds.tolist()``, a label string per sample
    if isinstance(prediction, (list, tuple)) and prediction and not isinstance(prediction[0], (int, float)):
        parts = [_split_samples(v, size) for v in prediction]
        if any(p is None for p in parts):
            return None
        return [type(prediction)(p[i] for p in parts) for i in range(size)]
    return None


def _is_collection(value: Any) -> bool:
    return isinstance(value, (Tensor, dict, list, tuple))


def _join_samples(samples: list[Any]) -> Any:
    first = samples[0]
    if not _is_collection(first):
        return list(samples)
    if isinstance(first, Tensor):
        return torch.stack(samples)
    if isinstance(first, dict):
        return {k: _join_samples([s[k] for s in samples]) for k in first}
    return type(first)(_join_samples([s[i] for s in samples]) for i in range(len(first)))


class PredictionLoop:
    """The predict pass. ``trainer.predict_loop`` during it, with what a prediction writer reads (Lightning's
    names): this rank's ``predictions`` (kept when they are returned or an epoch-end writer takes them), the
    dataset indices of the current batch's samples (``current_batch_indices``) and of every batch so far
    (``epoch_batch_indices``, per dataloader).
    """

    def __init__(self, engine: "Engine", return_predictions: bool = True):
        self.engine = engine
        self.return_predictions = return_predictions
        self._predictions: list[list[Any]] = []  # dataloaders x batches, this rank's
        self.epoch_batch_indices: list[list[list[int]]] = []  # dataloaders x batches x samples
        self.current_batch_indices: list[int] = []
        # An epoch-end writer is handed every prediction, returned or not (as in Lightning).
        self._writes_at_epoch_end = any(
            cb.write_interval != "batch" for cb in engine.callbacks if isinstance(cb, BasePredictionWriter)
        )

    @property
    def predictions(self) -> list[Any]:
        """This rank's predictions: a list of batch outputs (a list of such lists for several dataloaders)."""
        return self._predictions[0] if len(self._predictions) == 1 else self._predictions

    def run(self, loaders: list[PreparedLoader], budgets: list[int | float]) -> list[list[Any]] | None:
        """Predictions per dataloader, in dataset order; None without ``return_predictions``."""
        engine = self.engine
        hooks = engine.hooks
        # on_predict_model_eval() switches the module to eval; afterwards every submodule is back in the mode it
        # was in (a frozen, eval-mode part stays so), as in Lightning.
        modes = ModuleModes(engine.lightning_module)
        hooks.on_predict_start()
        hooks.on_predict_epoch_start()
        with torch.inference_mode():
            for dl_idx, (prepared, budget) in enumerate(zip(loaders, budgets)):
                outputs: list[Any] = []
                self._predictions.append(outputs)
                sampler = prepared.resumable  # it notes the indices of each batch it yields
                done: list[list[int]] = []
                self.epoch_batch_indices.append(done)
                for batch_idx, batch in enumerate(prepared.loader):
                    if batch_idx >= budget:
                        break
                    seen = sampler.yielded if sampler is not None else []
                    self.current_batch_indices = seen[batch_idx] if batch_idx < len(seen) else []
                    done.append(self.current_batch_indices)
                    batch = engine._prepare_batch(batch, dl_idx)
                    hooks.on_predict_batch_start(batch, batch_idx, dl_idx, len(loaders))
                    prediction = engine._predict_step(batch, batch_idx, dl_idx if len(loaders) > 1 else None)
                    hooks.on_predict_batch_end(prediction, batch, batch_idx, dl_idx, len(loaders))
                    if self.return_predictions or self._writes_at_epoch_end:
                        outputs.append(prediction)
                    engine._report_progress(RunningStage.PREDICTING, batch_idx + 1, budget, {})
        hooks.on_predict_epoch_end()
        hooks.on_predict_end()
        modes.restore()
        if not self.return_predictions:
            return None
        return [
            self._in_dataset_order(outputs, indices, prepared)
            for outputs, indices, prepared in zip(self._predictions, self.epoch_batch_indices, loaders)
        ]

    def _in_dataset_order(self, outputs: list[Any], batch_indices: list[list[int]], prepared: PreparedLoader) -> list[Any]:
        """Gather every rank's predictions and return them once each, in dataset order, re-batched."""
        strategy = self.engine.strategy
        if not strategy.is_distributed or prepared.distributed_sampler is None:
            return outputs
        cpu_outputs = [_to_cpu(o) for o in outputs]
        everyone = strategy.all_gather_object(list(zip(batch_indices, cpu_outputs)))
        by_index: dict[int, Any] = {}
        batch_size = max((len(idx) for idx, _ in everyone[0]), default=1)
        for rank_batches in everyone:
            for indices, prediction in rank_batches:
                samples = _split_samples(prediction, len(indices))
                if samples is None:
                    raise TypeError(
                        f"predict_step returned {type(prediction).__name__} whose first dimension is not the batch "
                        "size, so distributed predictions cannot be put back in dataset order; return a tensor (or "
                        "a dict/tuple of tensors) with one row per sample"
                    )
                for index, sample in zip(indices, samples):
                    by_index.setdefault(index, sample)  # DistributedSampler pads by repeating samples
        ordered = [by_index[i] for i in sorted(by_index)]
        return [_join_samples(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
