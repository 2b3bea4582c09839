"""``Trainer``: the Lightning-style facade the user's script talks to.

It validates every argument into a :class:`TrainerSpec` at construction,
creates the run directory, and runs the worker-side engine. With
``num_workers=0`` the engine runs here, in the driver process.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import cloudpickle
import torch
from torch import Tensor

from launcher.loggers import TensorBoardLogger
from launcher.progress import ProgressBar
from launcher.run_dir import RunDir, end_status, find_last_checkpoint, newest, newest_last_in
from launcher.submit import SUBMISSION_ENV, publish_run_dir
from launcher.spec import TrainerSpec
from runtime.callbacks import ModelCheckpoint
from runtime.callbacks.base import check_unique_state_keys
from runtime.checkpoint.io import load_checkpoint
from runtime.datamodule import LightningDataModule
from runtime.engine import Engine, with_module_callbacks
from runtime.hparams import hparams_for_loggers
from runtime.module import LightningModule
from runtime.sinks import FanOutMetricsSink, LocalCheckpointSink


class Trainer:
    """Validates its arguments (Lightning's names plus Ray scaling ones) and runs fit/validate/test/predict.

    ``num_workers=0`` runs in this process (no Ray), for debugging and tests;
    ``num_workers=N`` runs N Ray Train workers.
    """

    def __init__(self, **kwargs: Any):
        self.spec = TrainerSpec.from_kwargs(**kwargs)
        self.run_dir = RunDir.for_spec(self.spec)
        # Every run starts from these; the module's configure_callbacks() ones replace those of their type.
        self._callbacks: list[Any] = list(self.spec.callbacks)
        if self.spec.enable_checkpointing and not any(isinstance(cb, ModelCheckpoint) for cb in self._callbacks):
            # Saving last.ckpt by default is what makes fit(ckpt_path="last") and `raylight resume` work.
            self._callbacks.append(ModelCheckpoint(save_last=True))
        check_unique_state_keys(self._callbacks)  # here, before a Ray run would find it on its workers
        self.loggers = self._build_loggers(self.spec.logger)
        self._progress = ProgressBar(enabled=self.spec.enable_progress_bar)
        self._engine: Engine | None = None
        self._job_write = None  # the job file being written in the background (launcher.job_file.JobWrite)

    # ------------------------------------------------------------------ public
    def fit(
        self,
        model,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Any = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``model``; afterwards ``model`` holds the trained weights.

        ``ckpt_path``: a checkpoint path, or ``"last"`` for the newest of this
        run's ``last.ckpt`` and the ``last*.ckpt`` in each ModelCheckpoint's
        own ``dirpath`` (with no ``run_name`` and no such ``dirpath``, the
        newest run's under ``default_root_dir``), to resume exactly where it
        stopped; with none, a warning, and training starts from the beginning.
        """
        if self.loggers:
            # Clashing module and datamodule hyperparameters fail here, before anything is scheduled.
            dm = train_dataloaders if isinstance(train_dataloaders, LightningDataModule) else datamodule
            hparams_for_loggers(model, dm)
        path, checkpoint = self._resolve_checkpoint(ckpt_path)
        resume_step = _log_resume_step(checkpoint)
        payload = self._save_job(model, train_dataloaders, val_dataloaders, datamodule)
        if self.spec.num_workers > 0:
            self._start(model, resume_step=None)  # the sink actor trims the loggers for the resumed run
            try:
                self._run_on_ray(
                    "fit", model, path, checkpoint, train_dataloaders=train_dataloaders,
                    val_dataloaders=val_dataloaders, datamodule=datamodule, resume_step=resume_step, payload=payload,
                )
            except BaseException as err:
                self._finish(self._engine, end_status(err))
                raise
            self._finish(self._engine, "finished")
            return
        engine = self._new_engine()
        self._start(model, resume_step=resume_step)
        try:
            engine.fit(model, train_dataloaders, val_dataloaders, datamodule, checkpoint, path)
        except BaseException:
            self._finish(engine, "interrupted" if engine.state.status == "interrupted" else "failed")
            raise
        self._finish(engine, "finished")

    def validate(self, model=None, dataloaders=None, ckpt_path=None, verbose: bool = True, datamodule=None):
        """Run one validation pass; returns one dict of metrics per dataloader.

        Without ``model``, the previous fit's model with its best checkpoint's weights (as in Lightning).
        """
        return self._evaluate(model, dataloaders, ckpt_path, verbose, datamodule, testing=False)

    def test(self, model=None, dataloaders=None, ckpt_path=None, verbose: bool = True, datamodule=None):
        """Run one test pass; returns one dict of metrics per dataloader.

        Without ``model``, the previous fit's model with its best checkpoint's weights (as in Lightning).
        """
        return self._evaluate(model, dataloaders, ckpt_path, verbose, datamodule, testing=True)

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions: bool = True, ckpt_path=None):
        """Predictions in dataset order: a list of batch outputs (a list of such lists for several dataloaders).

        Without ``model``, the previous fit's model with its best checkpoint's weights (as in Lightning).
        """
        model, ckpt_path = self._model_and_checkpoint(model, ckpt_path, "predict")
        path, checkpoint = self._resolve_checkpoint(ckpt_path)
        if self.spec.num_workers > 0:
            with self._stage(model, create=not os.path.isdir(self.run_dir.path)):
                result = self._run_on_ray(
                    "predict", model, path, checkpoint, dataloaders=dataloaders, datamodule=datamodule,
                    return_predictions=return_predictions,
                )
            return result["predictions"]
        engine = self._new_engine(keep_progress=True)
        with self._stage(model, create=False):
            return engine.predict(model, dataloaders, datamodule, checkpoint, path, return_predictions)

    # ------------------------------------------------------------- properties
    @property
    def callback_metrics(self) -> dict[str, Tensor]:
        return self._engine.callback_metrics if self._engine is not None else {}

    @property
    def logged_metrics(self) -> dict[str, Tensor]:
        return self._engine.logged_metrics if self._engine is not None else {}

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        return self._engine.progress_bar_metrics if self._engine is not None else {}

    @property
    def current_epoch(self) -> int:
        return self._engine.current_epoch if self._engine is not None else 0

    @property
    def global_step(self) -> int:
        return self._engine.global_step if self._engine is not None else 0

    @property
    def should_stop(self) -> bool:
        return self._engine.should_stop if self._engine is not None else False

    @property
    def state(self):
        return self._engine.state if self._engine is not None else None

    @property
    def callbacks(self) -> list[Any]:
        """The last run's callbacks: the Trainer's, where ``configure_callbacks()`` returned one of the same type
        the module's instead (as in Lightning); before any run, the Trainer's own."""
        return self._engine.callbacks if self._engine is not None else self._callbacks

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def logger(self):
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        return self.loggers[0].log_dir if self.loggers else self.run_dir.path

    @property
    def default_root_dir(self) -> str:
        return os.path.dirname(self.run_dir.path)

    @property
    def estimated_stepping_batches(self) -> int | float:
        if self._engine is None:
            raise RuntimeError("estimated_stepping_batches is known once fit() has started")
        return self._engine.estimated_stepping_batches

    # Lightning Trainer attributes that scripts read after fit; they come from the last run's engine.
    _ENGINE_ATTRIBUTES = frozenset(
        {
            "optimizers",
            "lr_scheduler_configs",
            "lightning_module",
            "model",
            "num_training_batches",
            "num_val_batches",
            "num_sanity_val_batches",
            "num_sanity_val_steps",
            "num_test_batches",
            "num_predict_batches",
            "predict_loop",
            "max_epochs",
            "min_epochs",
            "max_steps",
            "min_steps",
            "accumulate_grad_batches",
            "gradient_clip_val",
            "gradient_clip_algorithm",
            "check_val_every_n_epoch",
            "val_check_interval",
            "log_every_n_steps",
            "is_global_zero",
            "world_size",
            "global_rank",
            "local_rank",
            "node_rank",
            "num_devices",
            "sanity_checking",
            "training",
            "validating",
            "testing",
            "predicting",
            "early_stopping_callback",
            "datamodule",
            "precision",
            "strategy",
            "fast_dev_run",
        }
    )

    def __getattr__(self, name: str) -> Any:
        if name in Trainer._ENGINE_ATTRIBUTES:
            engine = self.__dict__.get("_engine")
            if engine is None:
                raise AttributeError(f"Trainer.{name} is set once fit/validate/test/predict has started")
            return getattr(engine, name)
        raise AttributeError(f"'Trainer' object has no attribute {name!r}")

    def save_checkpoint(self, filepath: str, weights_only: bool = False) -> None:
        """Write a checkpoint of the last run's state (after fit, or from a callback during it)."""
        if self._engine is None:
            raise RuntimeError("save_checkpoint() needs a model that went through fit/validate/test first")
        if self.spec.num_workers > 0 and not weights_only:
            ckpt = self.checkpoint_callback
            kept = [p for p in ((ckpt.last_model_path, ckpt.best_model_path) if ckpt is not None else ()) if p]
            raise RuntimeError(
                f"trainer.save_checkpoint({str(filepath)!r}) after a Ray run: this driver has the trained weights but "
                "not the optimizer and loop state, which stayed on the workers, so the file could not resume "
                "training. Pass weights_only=True to save the weights, or resume from the run's own checkpoints"
                + (f" ({', '.join(dict.fromkeys(kept))})" if kept else "")
            )
        self._engine.save_checkpoint(filepath, weights_only)

    # --------------------------------------------------------------- internals
    def _build_loggers(self, logger: Any) -> list[Any]:
        if logger is True:
            return [TensorBoardLogger()]
        if logger is False or logger is None:
            return []
        return list(logger) if isinstance(logger, (list, tuple)) else [logger]

    def _save_job(self, model, train_dataloaders, val_dataloaders, datamodule) -> bytes | None:
        """Keep the job in the run directory (signed), so `raylight resume` can finish the run if this driver dies.

        Returns the serialised job, which a Ray run ships to its workers as is (the job is pickled once).
        """
        from launcher.job_file import write_job
        from launcher.ray.job import prepare_job, serialize_job

        job = self._job(
            "fit", model, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders, datamodule=datamodule
        )
        os.makedirs(self.run_dir.path, exist_ok=True)
        if self.spec.num_workers > 0:
            payload = serialize_job(job)  # names the attribute that cannot travel, before anything is scheduled
        else:
            prepare_job(job)  # the driver's seed; the user's own modules pickled by value
            try:
                payload = cloudpickle.dumps(job)
            except Exception as err:  # noqa: BLE001 - in-process runs need not be picklable
                self._warn_job_not_saved(err)
                return None
        try:
            # Pickled here (training changes the module next); signed and written while training starts.
            self._job_write = write_job(self.run_dir.path, {"job": payload, "loggers": self.loggers})
        except Exception as err:  # noqa: BLE001 - a logger that cannot be pickled
            if self.spec.num_workers > 0:
                raise TypeError(
                    f"a logger cannot be pickled ({type(err).__name__}: {err}): on Ray the loggers are sent to an "
                    "actor on this machine that writes what the workers log. Open files, locks and connections in "
                    "the logger's first log call instead of in __init__"
                ) from err
            self._warn_job_not_saved(err)
        return payload

    def _warn_job_not_saved(self, err: Exception) -> None:
        warnings.warn(
            f"the job could not be saved to {self.run_dir.path} ({type(err).__name__}: {err}); training goes "
            "on, but `raylight resume` will not be able to finish this run if the driver dies",
            stacklevel=4,
        )

    def _wait_for_job_file(self) -> None:
        """Until the job file is on disk; a failed write is a warning (the run itself did not need it)."""
        pending, self._job_write = self._job_write, None
        error = pending.wait() if pending is not None else None
        if error is not None:
            warnings.warn(
                f"the job could not be saved to {pending.run_dir} ({type(error).__name__}: {error}); "
                "`raylight resume` will not be able to finish this run if it is interrupted",
                stacklevel=3,
            )

    def _job(self, stage: str, model, initial_progress=None, **data):
        """The job the workers run: what this Trainer's spec says, for ``stage``, with its data."""
        from launcher.ray.job import STREAM_FILES_ENV, TUNE_MALLOC_ENV, Job

        return Job(
            stage=stage,
            module=model,
            config=self.spec.to_run_config(self.run_dir.path),
            callbacks=self._callbacks,
            logger_count=len(self.loggers),
            progress_bar=self.spec.enable_progress_bar,
            stream_files=os.environ.get(STREAM_FILES_ENV, "") == "1",
            tune_malloc=os.environ.get(TUNE_MALLOC_ENV, "1") != "0",
            initial_progress=initial_progress,
            **{
                k: v
                for k, v in data.items()
                if k in ("train_dataloaders", "val_dataloaders", "dataloaders", "datamodule", "return_predictions")
            },
        )

    def _run_on_ray(
        self, stage: str, model, path, checkpoint, *, resume_step=None, payload: bytes | None = None, **data
    ) -> dict[str, Any]:
        """Ship the job to Ray Train workers, then mirror what rank 0 sent back onto this Trainer and model."""
        from launcher.ray.backend import RayRunSettings, run_job

        previous = self._engine
        initial = None
        if previous is not None and stage != "fit":
            initial = (previous.current_epoch, previous.global_step, previous.fit_loop_batches_that_stepped)
        job = self._job(stage, model, initial_progress=initial, **data)
        settings = RayRunSettings(
            num_workers=self.spec.num_workers,
            use_gpu=self.spec.use_gpu,
            resources_per_worker=self.spec.resources_per_worker,
            placement_strategy=self.spec.placement_strategy,
            address=self.spec.address,
            max_failures=self.spec.max_failures,
            collective_timeout_s=self.spec.collective_timeout_s,
            resource_wait_s=self.spec.resource_wait_s,
            run_name=self.run_dir.name,
            run_dir=self.run_dir.path,
        )
        view = Engine(self.spec.to_run_config(self.run_dir.path), callbacks=self._callbacks, loggers=self.loggers)
        view.lightning_module = model
        self._engine = view
        try:
            result = run_job(job, settings, self.loggers, path, resume_step, self._progress.progress, payload=payload)
        finally:
            self._progress.finalize("finished")
        _load_trained_weights(model, result["state_dict"], self.spec.precision)
        # The workers' callbacks stay on the workers, and their states come back: load them into this side's
        # copies of the callbacks the run used, which include the module's own from configure_callbacks().
        view.callbacks = with_module_callbacks(self._callbacks, model)
        for cb in view.callbacks:
            state = result["callbacks"].get(cb.state_key)
            if state:
                cb.load_state_dict(state)
        view.continue_from(result["current_epoch"], result["global_step"], result["batches_that_stepped"])
        view.should_stop = result["should_stop"]
        view._callback_metrics = {k: torch.tensor(v) for k, v in result["callback_metrics"].items()}
        view._logged_metrics = {k: torch.tensor(v) for k, v in result["logged_metrics"].items()}
        view._progress_bar_metrics = dict(result["progress_bar_metrics"])
        view.state.status = "finished"
        self.attempts = result["attempts"]
        return result

    def _new_engine(self, keep_progress: bool = False) -> Engine:
        previous = self._engine
        sinks = [*self.loggers, self._progress]
        self._engine = Engine(
            self.spec.to_run_config(self.run_dir.path),
            callbacks=self._callbacks,
            metrics_sink=FanOutMetricsSink(sinks),
            checkpoint_sink=_RunDirCheckpointSink(self.run_dir),
            loggers=self.loggers,
        )
        if keep_progress and previous is not None:
            # trainer.validate/test after fit report the fitted epoch and step and log at the fit's last
            # logger step, as Lightning's do.
            self._engine.continue_from(
                previous.current_epoch, previous.global_step, previous.fit_loop_batches_that_stepped
            )
        return self._engine

    def _start(self, model, resume_step: int | None, create: bool = True) -> None:
        if create:
            self.run_dir.create(self.spec)
            self.run_dir.write_status("running")
        if os.environ.get(SUBMISSION_ENV):
            publish_run_dir(self.run_dir.path, self.spec.address)  # `raylight submit` downloads it when the job ends
        for logger in self.loggers:
            if hasattr(logger, "attach"):
                logger.attach(self.run_dir.path, resume_step=resume_step)
        graph_loggers = [logger for logger in self.loggers if hasattr(logger, "log_graph")]
        if graph_loggers and isinstance(model, LightningModule):
            # As Lightning does at every stage's start; traced here, on the driver, where the loggers are. Tracing
            # reads every attribute of the module, `trainer` included, which raises while the module has none.
            previous, model.trainer = model._trainer, self
            try:
                for logger in graph_loggers:
                    logger.log_graph(model)
            finally:
                model.trainer = previous

    def _finish(self, engine: Engine, status: str) -> None:
        self._wait_for_job_file()
        ckpt = self.checkpoint_callback
        # Each committed checkpoint was recorded as it was committed (here, or by a Ray run's sink actor): the
        # newest one is what `raylight resume` continues from, also when no ModelCheckpoint keeps a last.ckpt
        # and when a failed Ray run never sent its state back (this driver's engine is then still at step 0).
        recorded = self.run_dir.read_status()
        progress = (engine.current_epoch, engine.global_step)
        if engine.global_step < recorded.get("global_step", 0):
            progress = (recorded["epoch"], recorded["global_step"])
        last = recorded.get("last_checkpoint") or ((ckpt.last_model_path or None) if ckpt is not None else None)
        self.run_dir.write_status(
            status,
            epoch=progress[0],
            global_step=progress[1],
            last_checkpoint=last,
            best_checkpoint=(ckpt.best_model_path or None) if ckpt is not None else None,
            best_score=(float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None),
        )

    def _resolve_checkpoint(self, ckpt_path: str | None) -> tuple[str | None, dict[str, Any] | None]:
        """(path, loaded checkpoint) for ``ckpt_path``: a path, "last" or "best"."""
        if ckpt_path is None:
            return None, None
        path = str(ckpt_path)
        if path == "last":
            path = self._find_last()
            if path is None:
                return None, None
        elif path == "best":
            ckpt = self.checkpoint_callback
            if ckpt is None or not ckpt.best_model_path:
                raise ValueError(
                    'ckpt_path="best" needs a ModelCheckpoint that has saved a checkpoint; run fit() first or '
                    "pass a checkpoint path"
                )
            path = ckpt.best_model_path
        return path, load_checkpoint(path)

    def _find_last(self) -> str | None:
        """For ``ckpt_path="last"``: the newest ``last*.ckpt`` in this run's checkpoint directory and in each
        ModelCheckpoint's own ``dirpath`` (as in Lightning: a ``last-v1.ckpt`` is the newer run's when two runs
        shared a directory); with neither, no ``run_name`` and no such dirpath,
        the newest run's ``last.ckpt`` under ``default_root_dir``. None (with a warning) when there is none:
        a script can always pass "last" and start from the beginning the first time, as with Lightning.
        """
        own_dirs = [
            cb.dirpath
            for cb in self.checkpoint_callbacks
            if cb.dirpath and os.path.realpath(cb.dirpath) != os.path.realpath(self.run_dir.checkpoint_dir)
        ]
        places = [newest_last_in(directory) for directory in (self.run_dir.checkpoint_dir, *own_dirs)]
        found = newest([path for path in places if path and os.path.isfile(path)])
        if found is not None:
            return found
        searched = [self.run_dir.checkpoint_dir, *own_dirs]
        if self.spec.run_name is None and not own_dirs:
            other_run = find_last_checkpoint(os.path.dirname(self.run_dir.path))
            if other_run is not None:
                # Continue in the run that wrote it, so its logs and checkpoints stay together.
                self.run_dir = RunDir(os.path.dirname(os.path.dirname(other_run)))
                return other_run
            searched.append(f"any run under {os.path.dirname(self.run_dir.path)}")
        warnings.warn(
            f'ckpt_path="last": no last checkpoint in {", ".join(searched)}, so none is loaded (fit starts from '
            "the beginning; validate, test and predict use the model's weights as they are). "
            "ModelCheckpoint(save_last=True) keeps one",
            stacklevel=4,
        )
        return None

    def _model_and_checkpoint(self, model, ckpt_path: str | None, stage: str) -> tuple[Any, str | None]:
        """The model to run ``stage`` on, and the checkpoint to load into it.

        As in Lightning, a call without a model takes the previous call's, with the best checkpoint's
        weights unless ``ckpt_path`` says otherwise (warning that it does so).
        """
        if model is not None:
            return model, ckpt_path
        if self._engine is None or self._engine.lightning_module is None:
            raise ValueError(f"trainer.{stage}() needs a model: pass it as the first argument")
        if ckpt_path is None:
            warnings.warn(
                f"trainer.{stage}() was called without a model: it runs the previous fit's model with the weights "
                f"of its best checkpoint (as Lightning does). Pass ckpt_path='best', 'last' or a path to choose "
                "(and silence this warning), or pass the model to use its weights as they are",
                stacklevel=3 if stage == "predict" else 4,
            )
            ckpt_path = "best"
        return self._engine.lightning_module, ckpt_path

    @contextmanager
    def _stage(self, model, create: bool) -> Iterator[None]:
        """A validate/test/predict call: a run directory made for it alone ends with the call's status."""
        self._start(model, resume_step=None, create=create)
        try:
            yield
        except BaseException as err:
            if create:
                self.run_dir.write_status(end_status(err))
            raise
        if create:
            self.run_dir.write_status("finished")

    def _evaluate(self, model, dataloaders, ckpt_path, verbose, datamodule, testing: bool):
        model, ckpt_path = self._model_and_checkpoint(model, ckpt_path, "test" if testing else "validate")
        path, checkpoint = self._resolve_checkpoint(ckpt_path)
        create = not os.path.isdir(self.run_dir.path)
        if self.spec.num_workers > 0:
            stage = "test" if testing else "validate"
            with self._stage(model, create):
                result = self._run_on_ray(stage, model, path, checkpoint, dataloaders=dataloaders, datamodule=datamodule)
            results = result["results"]
        else:
            engine = self._new_engine(keep_progress=True)
            with self._stage(model, create):
                results = (engine.test if testing else engine.validate)(model, dataloaders, datamodule, checkpoint, path)
        if verbose:
            _print_results(results, "Test" if testing else "Validate")
        return results


def _load_trained_weights(model, state_dict: dict[str, Any], precision: str) -> None:
    """The workers' final weights into the driver's ``model``, in the precision they trained in (``64-true``
    converts the module, as in-process).

    Layers the workers built in ``setup()`` are not in the driver's module: their weights are left out with a
    warning, as Lightning's spawning strategies leave them, instead of failing the finished run.
    """
    from runtime.precision import Precision

    Precision(precision, torch.device("cpu")).convert_module(model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing:
        raise RuntimeError(
            f"the trained weights lack {', '.join(missing)}, which the driver's model has; was the module changed "
            "on the workers (a layer removed or renamed in setup())? Load the run's last checkpoint instead"
        )
    if unexpected:
        warnings.warn(
            f"the workers' model has {', '.join(unexpected)}, which the driver's model does not (built in setup() "
            "on the workers): those weights are not in your model object. Build the layers in __init__, or load "
            "them from the run's checkpoints",
            stacklevel=4,
        )


def _log_resume_step(checkpoint: dict[str, Any] | None) -> int | None:
    """The logger step from which a resumed run rewrites rows (see FitLoop.state_dict)."""
    if checkpoint is None:
        return None
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    return int(fit_loop.get("log_resume_step", checkpoint.get("global_step", 0)))


def _print_results(results: list[dict[str, float]], title: str) -> None:
    """The table Lightning prints after validate/test: a row per metric, a column per dataloader, centred cells.

    A row is named without its ``/dataloader_idx_N`` suffix: the column already says which dataloader it is.
    """
    cells: dict[str, list[str]] = {}
    for i, result in enumerate(results):
        for key, value in result.items():
            name = key.removesuffix(f"/dataloader_idx_{i}")
            cells.setdefault(name, [""] * len(results))[i] = str(value)
    if not cells:
        return
    header = [f"{title} metric", *(f"DataLoader {i}" for i in range(len(results)))]
    rows = [header, *([name, *cells[name]] for name in sorted(cells))]
    width = max(25, max(len(cell) for row in rows for cell in row) + 4)
    rule = "\u2500" * (width * len(header))
    print(rule)
    for i, row in enumerate(rows):
        print("".join(cell.center(width) for cell in row).rstrip())
        if i == 0:
            print(rule)
    print(rule)


class _RunDirCheckpointSink(LocalCheckpointSink):
    """Writes checkpoints atomically and notes each in the run's status.json (in-process runs)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def save(self, checkpoint: dict[str, Any], path: str) -> None:
        super().save(checkpoint, path)
        self.run_dir.record_checkpoint(path, int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))
