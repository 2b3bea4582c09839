"""The validated Trainer arguments: :class:`TrainerSpec`.

``Trainer(...)`` is a thin facade over this model. Every argument is checked
here, on the driver, before anything is scheduled; the frozen spec is then
written to the run directory as ``spec.json`` and turned into the runtime's
plain :class:`runtime.config.RunConfig` for the workers.

Argument names, meanings and defaults follow Lightning's ``Trainer`` so a
ported script keeps its call unchanged; the Ray scaling arguments
(``num_workers``, ``use_gpu``, ...) are raylight's own.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import secrets
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runtime.callbacks.base import Callback
from runtime.config import RunConfig
from runtime.sinks import MetricsSink

__all__ = ["SpecError", "TrainerSpec", "new_run_name"]


class SpecError(ValueError):
    """Invalid ``Trainer`` arguments; the message lists every problem found.

    ``problems`` holds one line per problem, each naming the argument, the
    value given and what is allowed.
    """

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "argument" if len(self.problems) == 1 else "arguments"
        super().__init__(f"Invalid Trainer {noun}:\n{lines}")

    def __reduce__(self):
        # The default exception pickling would call SpecError(message), which
        # is not this constructor's signature.
        return (type(self), (self.problems,))


# --- canonical values and their Lightning aliases ----------------------------

_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true")
_PRECISION_ALIASES: dict[Any, str] = {
    32: "32-true",
    "32": "32-true",
    16: "16-mixed",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    64: "64-true",
    "64": "64-true",
}
_PRECISION_HELP = (
    "expected one of " + ", ".join(repr(p) for p in _PRECISIONS) + " (or the aliases 32, 16, 'bf16', 64),"
    " or None ('32-true')"
)

# Integer arguments: (smallest allowed, None allowed, what the special values mean).
_INT_RULES: dict[str, tuple[int, bool, str]] = {
    "max_epochs": (-1, True, "-1 = no epoch limit; None = 1000 epochs unless max_steps is set"),
    "min_epochs": (0, True, "None = no minimum"),
    "max_steps": (-1, False, "-1 = no step limit"),
    "min_steps": (0, True, "None = no minimum"),
    "check_val_every_n_epoch": (1, True, "None = validate only every val_check_interval batches"),
    "num_sanity_val_steps": (-1, False, "-1 = all validation batches, 0 = no sanity check; None = 2"),
    "log_every_n_steps": (0, False, "steps between logged rows; None = 50"),
    "accumulate_grad_batches": (1, False, "batches per optimizer step"),
    "num_workers": (0, False, "0 = run in the driver process without Ray, N = N Ray Train workers"),
    "max_failures": (-1, False, "-1 = restart forever, 0 = never restart"),
}

_LIMIT_FIELDS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")

# Arguments whose Lightning default is None, read as "use the default": a script that passes config or argparse
# values straight through has these Nones. Dropping the key gives raylight's default, the value Lightning resolves
# None to (precision "32-true", 50, 2, 1.0, True). deterministic=None leaves torch's deterministic-algorithms
# setting alone in Lightning, which is what raylight's False does (only True and "warn" touch it).
_NONE_MEANS_DEFAULT = (
    "precision",
    "log_every_n_steps",
    "num_sanity_val_steps",
    *_LIMIT_FIELDS,
    "val_check_interval",
    "enable_checkpointing",
    "enable_progress_bar",
    "deterministic",
)

# Lightning Trainer arguments raylight does not take, and what to do instead. Without this table difflib would
# suggest a raylight argument with another meaning (num_nodes -> num_workers turns an in-process run into a Ray run).
_LIGHTNING_ONLY: dict[str, str] = {
    "barebones": "remove it; for the least overhead pass logger=False, enable_checkpointing=False,"
    " enable_progress_bar=False and num_sanity_val_steps=0",
    "benchmark": "remove it; to let cuDNN autotune, set torch.backends.cudnn.benchmark = True in your"
    " LightningModule's setup() (it runs in every worker)",
    "enable_autolog_hparams": "remove it; raylight logs the hyperparameters saved with self.save_hyperparameters(),"
    " as Lightning's default does: save them with save_hyperparameters(logger=False) to keep them out of the loggers",
    "inference_mode": "remove it; raylight runs validation and test under torch.no_grad() and predict under"
    " torch.inference_mode()",
    "max_time": "remove it; bound the run with max_epochs or max_steps, or stop it from a Callback that sets"
    " trainer.should_stop = True once your time is up",
    "model_registry": "remove it; raylight uploads nothing: the checkpoints stay in"
    " <default_root_dir>/<run_name>/checkpoints/",
    "overfit_batches": "remove it; for the same effect pass limit_train_batches=N and limit_val_batches=N and build"
    " the training DataLoader with shuffle=False",
    "plugins": "remove it; set the precision with precision=...; Ray and raylight provide the cluster environment"
    " and checkpoint I/O",
    "profiler": "remove it; profile your LightningModule's code with torch.profiler, or the whole process with"
    " py-spy",
    "reload_dataloaders_every_n_epochs": "remove it; raylight asks for the dataloaders once per fit: to change"
    " the data each epoch, make the Dataset change it (e.g. from the LightningModule's on_train_epoch_start)",
    "sync_batchnorm": "remove it; on GPU workers, convert the BatchNorm layers yourself in the LightningModule's"
    " __init__ with torch.nn.SyncBatchNorm.convert_sync_batchnorm(...)",
}

_RUN_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_RUN_NAME_MAX = 200  # keeps <default_root_dir>/<run_name>/checkpoints/... within common path limits


def _invalid(message: str) -> PydanticCustomError:
    # A custom error type keeps pydantic from prefixing "Value error, ", so the
    # message reads the same in SpecError and in a raw ValidationError.
    return PydanticCustomError("trainer_spec", message)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but True/False as a count is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def new_run_name(now: datetime | None = None) -> str:
    """A fresh run name, ``run-YYYYmmdd-HHMMSS-xxxx`` (local time, 4 random hex digits).

    The Trainer calls this when ``run_name`` is None; the random suffix keeps
    two runs started in the same second apart.
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{secrets.token_hex(2)}"


class TrainerSpec(BaseModel):
    """Every ``Trainer`` argument, validated once on the driver and then frozen.

    Lightning's loop arguments keep their Lightning names, defaults and
    meanings. Ray scaling arguments are raylight's own:

    - ``num_workers``: 0 runs in the driver process without Ray (debugging);
      N >= 1 runs N Ray Train workers.
    - ``use_gpu``, ``resources_per_worker``, ``placement_strategy``: passed to
      Ray Train's scaling config.
    - ``address``: the Ray cluster to join; None starts or joins a local Ray.
    - ``max_failures``: worker-group restarts before the run fails (-1 = forever).
    - ``collective_timeout_s``: how long a rank waits in a collective (a
      gradient all-reduce, a ``sync_dist`` gather) for the others before the
      attempt fails (and restarts if ``max_failures`` allows); a rank stuck
      inside a step is caught by this. torch's default, 30 minutes.
    - ``resource_wait_s``: how long the driver waits for the cluster to have
      room for every worker (an autoscaler may be adding nodes) before it
      fails with a resource error instead of waiting forever.
    - ``run_name``: the run directory's name under ``default_root_dir``; None
      lets the Trainer pick one with :func:`new_run_name`.

    ``strategy`` takes Lightning's DDP names: workers always run DDP, and
    ``"ddp_find_unused_parameters_true"`` lets a backward leave parameters
    without gradients (a manual-optimization GAN that steps its generator and
    discriminator with separate backward passes needs it, as in Lightning).

    Lightning aliases: ``accelerator="gpu"``/``"cuda"`` means ``use_gpu=True``
    (``"auto"`` leaves ``use_gpu`` as given, since the driver cannot see the
    workers' devices; with ``num_workers=0`` it uses this machine's GPU when
    there is one, as in Lightning); ``devices=N`` means ``num_workers=N`` unless
    ``num_workers`` is also given, in which case the two must agree.

    ``precision`` is stored in its canonical form (``32`` -> ``"32-true"``,
    ``"bf16"`` -> ``"bf16-mixed"``, ...). ``limit_*_batches`` and
    ``val_check_interval`` keep their type: an int is a batch count, a float
    a fraction (as in Lightning, a whole float above 1 such as ``10.0``
    becomes the int ``10``). ``fast_dev_run`` is stored as given (``True`` or
    an int) and becomes a batch count in :meth:`to_run_config`.

    An explicit ``None`` means the default wherever Lightning's signature has
    ``None`` as its default (``precision``, ``log_every_n_steps``,
    ``limit_*_batches``, ``deterministic``, ...), as in Lightning.
    ``enable_model_summary`` (any value) and ``num_nodes=1`` are accepted and
    do nothing; Lightning arguments raylight lacks (``max_time``,
    ``sync_batchnorm``, ...) are refused with what to do instead.

    ``callbacks`` and ``logger`` may hold objects. They are kept on the spec
    for the Trainer but are not data: :meth:`to_json` leaves out
    ``callbacks`` always, and ``logger`` unless it is the bool ``True`` or
    ``False``. A spec read back with :meth:`from_json` therefore has no
    callbacks and, if it had logger objects, ``logger=True`` (the default
    TensorBoard logger).

    Build one with :meth:`from_kwargs` to get a :class:`SpecError` that lists
    every problem and suggests names for misspelt arguments.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    # --- loop limits
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    limit_predict_batches: int | float = 1.0
    val_check_interval: int | float = 1.0
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 50
    # --- optimisation
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: Literal["norm", "value"] | None = None  # None clips by norm, as in Lightning
    precision: str = "32-true"
    deterministic: bool | Literal["warn"] = False  # True: torch errors on nondeterministic ops; "warn": warns
    detect_anomaly: bool = False
    fail_on_nonfinite_loss: bool = False
    # --- outputs
    callbacks: list[Any] = Field(default_factory=list, exclude=True)
    logger: Any = True
    enable_checkpointing: bool = True
    enable_progress_bar: bool = True
    default_root_dir: str | None = None
    # --- debugging and data
    fast_dev_run: bool | int = False
    use_distributed_sampler: bool = True
    # --- Ray scaling
    num_workers: int = 0
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    address: str | None = None
    max_failures: int = 0
    collective_timeout_s: float = 1800.0
    resource_wait_s: float = 60.0
    run_name: str | None = None
    # --- Lightning aliases for the scaling arguments
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = "auto"
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false"] = "auto"
    # --- Lightning arguments accepted so a ported call runs unchanged; they have no effect
    enable_model_summary: bool | None = None  # raylight prints no model summary, whatever the value
    num_nodes: int = 1  # Lightning's default; Ray places the workers on the cluster's nodes

    # ------------------------------------------------------------- validators

    @model_validator(mode="before")
    @classmethod
    def _drop_none_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in _NONE_MEANS_DEFAULT)}
        return data

    @field_validator(*_INT_RULES, mode="before")
    @classmethod
    def _check_int(cls, value: Any, info: ValidationInfo) -> Any:
        minimum, nullable, meaning = _INT_RULES[info.field_name]
        if value is None and nullable:
            return None
        if _is_int(value) and value >= minimum:
            return value
        allowed = f"an int >= {minimum}" + (" or None" if nullable or info.field_name in _NONE_MEANS_DEFAULT else "")
        raise _invalid(f"expected {allowed} ({meaning})")

    @field_validator(*_LIMIT_FIELDS, mode="before")
    @classmethod
    def _check_limit(cls, value: Any) -> Any:
        if _is_int(value) and value >= 0:
            return value
        if isinstance(value, float):
            if 0.0 <= value <= 1.0:
                return value
            if value > 1.0 and value.is_integer() and math.isfinite(value):
                return int(value)  # Lightning reads a whole float like 10.0 as 10 batches
        raise _invalid(
            "expected an int >= 0 (a number of batches), a float in [0.0, 1.0] (a fraction of them) or None (1.0)"
        )

    @field_validator("val_check_interval", mode="before")
    @classmethod
    def _check_val_interval(cls, value: Any) -> Any:
        if _is_int(value) and value >= 1:
            return value
        if isinstance(value, float):
            if 0.0 < value <= 1.0:
                return value
            if value > 1.0 and value.is_integer() and math.isfinite(value):
                return int(value)
        allowed = (
            "expected an int >= 1 (validate every N training batches), a float in (0.0, 1.0]"
            " (a fraction of the training epoch) or None (1.0)"
        )
        if isinstance(value, (str, timedelta, dict)):
            raise _invalid(f"Lightning's time-based val_check_interval is not supported by raylight: {allowed}")
        raise _invalid(allowed)

    @field_validator("gradient_clip_val", mode="before")
    @classmethod
    def _check_clip_val(cls, value: Any) -> Any:
        if value is None:
            return None
        if _is_number(value) and math.isfinite(value) and value >= 0:
            return float(value)
        raise _invalid("expected None (no clipping) or a finite number >= 0")

    @field_validator("gradient_clip_algorithm", mode="before")
    @classmethod
    def _lower_clip_algorithm(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # Lightning accepts "NORM" and "Value" too

    @field_validator("deterministic", mode="before")
    @classmethod
    def _check_deterministic(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "warn":
            return value
        raise _invalid(
            "expected a boolean or 'warn' (nondeterministic ops warn instead of raising), or None (False: torch's"
            " setting is left alone)"
        )

    @field_validator("precision", mode="before")
    @classmethod
    def _normalise_precision(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise _invalid(_PRECISION_HELP)
        if isinstance(value, str) and value in _PRECISIONS:
            return value
        if isinstance(value, (int, str)) and value in _PRECISION_ALIASES:
            return _PRECISION_ALIASES[value]
        hint = ""
        if value in ("16-true", "transformer-engine", "transformer-engine-float16") or (
            isinstance(value, str) and value.startswith("bitsandbytes")
        ):
            hint = f"; {value!r} is a Lightning precision raylight does not support"
        raise _invalid(_PRECISION_HELP + hint)

    @field_validator("fast_dev_run", mode="before")
    @classmethod
    def _check_fast_dev_run(cls, value: Any) -> Any:
        if isinstance(value, bool) or (_is_int(value) and value >= 0):
            return value
        raise _invalid("expected True/False or an int >= 0 (batches of each stage to run; True = 1)")

    @field_validator("default_root_dir", mode="before")
    @classmethod
    def _check_root_dir(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            if isinstance(path, str) and path:
                return path
        raise _invalid("expected a non-empty path (str or os.PathLike) or None (the current working directory)")

    @field_validator("resources_per_worker", mode="before")
    @classmethod
    def _check_resources(cls, value: Any) -> Any:
        if value is None:
            return None
        allowed = "expected None or a dict of resource name -> amount > 0, e.g. {'CPU': 2, 'GPU': 1}"
        if not isinstance(value, dict):
            raise _invalid(allowed)
        if not value:
            # Ray Train would schedule workers that reserve nothing, any number of them on one node.
            raise _invalid(f"{allowed}; an empty dict reserves nothing per worker: pass None for Ray Train's "
                           "default (1 CPU, or 1 GPU with use_gpu=True)")
        bad = [
            f"{k!r}: {v!r}"
            for k, v in value.items()
            if not (isinstance(k, str) and k and _is_number(v) and math.isfinite(v) and v > 0)
        ]
        if bad:
            raise _invalid(f"{allowed}; invalid entries: {', '.join(bad)}")
        return {k: float(v) for k, v in value.items()}

    @field_validator("collective_timeout_s", "resource_wait_s", mode="before")
    @classmethod
    def _check_seconds(cls, value: Any) -> Any:
        if _is_number(value) and 0 < value < float("inf"):
            return float(value)
        raise _invalid("expected a positive number of seconds")

    @field_validator("address", mode="before")
    @classmethod
    def _check_address(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("ray://"):
            raise _invalid(
                "Ray Client addresses are not supported: the driver would run on the head node and write the run "
                "directory there, not on this machine. Submit the script instead: raylight submit --address "
                "http://HEAD:8265 -- python train.py (its run directory comes back here), or run it on a cluster "
                "node with address='auto'"
            )
        if value is None or (isinstance(value, str) and value.strip()):
            return value
        raise _invalid("expected None (start or join a local Ray) or a Ray address such as 'auto' or 'head:6379'")

    @field_validator("run_name", mode="before")
    @classmethod
    def _check_run_name(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str) and len(value) <= _RUN_NAME_MAX and _RUN_NAME_RE.fullmatch(value):
            return value
        raise _invalid(
            f"expected None (a generated name) or up to {_RUN_NAME_MAX} letters, digits, '-', '_' or '.',"
            " not starting with '.' (it names a directory)"
        )

    @field_validator("devices", mode="before")
    @classmethod
    def _check_devices(cls, value: Any) -> Any:
        if value == "auto" or (_is_int(value) and value >= 1):
            return value
        raise _invalid(
            "expected 'auto' or an int >= 1 (an alias for num_workers: one Ray Train worker per device);"
            " device lists and -1 are not supported, set num_workers instead"
        )

    @field_validator("enable_model_summary", mode="before")
    @classmethod
    def _check_model_summary(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return value
        raise _invalid("expected True, False or None (accepted from Lightning; raylight prints no model summary)")

    @field_validator("num_nodes", mode="before")
    @classmethod
    def _check_num_nodes(cls, value: Any) -> Any:
        if _is_int(value) and value == 1:
            return value
        raise _invalid(
            "raylight takes no node count: Ray places the num_workers workers across the cluster's nodes. Remove"
            " num_nodes and pass num_workers=<total workers> (num_nodes x devices per node, e.g. num_workers=8"
            " for num_nodes=2, devices=4)"
        )

    @field_validator("callbacks", mode="before")
    @classmethod
    def _check_callbacks(cls, value: Any) -> Any:
        if value is None:
            return []
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        bad = [
            f"[{i}] {type(c).__module__}.{type(c).__qualname__}"
            for i, c in enumerate(items)
            if not isinstance(c, Callback)
        ]
        if bad:
            raise _invalid(
                "expected a runtime Callback or a list of them (import callbacks from `runtime`, not"
                f" `lightning.pytorch`); not callbacks: {', '.join(bad)}"
            )
        return items

    @field_validator("logger", mode="before")
    @classmethod
    def _check_logger(cls, value: Any) -> Any:
        if value is None:
            return True  # Lightning's default: logger=None means the default logger
        if isinstance(value, bool):
            return value
        items = list(value) if isinstance(value, (list, tuple)) else None
        bad = [
            f"{type(x).__module__}.{type(x).__qualname__}"
            for x in (items if items is not None else [value])
            if not isinstance(x, MetricsSink)
        ]
        if bad:
            raise _invalid(
                "expected True (default TensorBoard logger), False (no logger), or a logger or list of loggers"
                " from `launcher` (TensorBoardLogger, CSVLogger) or any runtime.sinks.MetricsSink;"
                f" not loggers: {', '.join(bad)}"
            )
        return items if items is not None else value

    @model_validator(mode="after")
    def _resolve_aliases(self) -> TrainerSpec:
        if self.accelerator in ("gpu", "cuda"):
            if "use_gpu" in self.model_fields_set and not self.use_gpu:
                raise _invalid(
                    f"accelerator={self.accelerator!r} and use_gpu=False disagree: accelerator is an alias for"
                    " use_gpu; pass only one of them"
                )
            # The model is frozen; this is the one place it is completed.
            object.__setattr__(self, "use_gpu", True)
        elif self.accelerator == "cpu" and self.use_gpu:
            raise _invalid(
                "accelerator='cpu' and use_gpu=True disagree: accelerator is an alias for use_gpu;"
                " pass only one of them"
            )

        if self.devices != "auto":
            if "num_workers" in self.model_fields_set and self.num_workers != self.devices:
                raise _invalid(
                    f"devices={self.devices!r} and num_workers={self.num_workers!r} disagree: devices is an"
                    " alias for num_workers; pass only num_workers (or make them equal)"
                )
            object.__setattr__(self, "num_workers", self.devices)

        if self.check_val_every_n_epoch is None and isinstance(self.val_check_interval, float):
            raise _invalid(
                f"check_val_every_n_epoch=None needs an int val_check_interval (validate every N training"
                f" batches), got val_check_interval={self.val_check_interval!r}"
            )
        return self

    # ---------------------------------------------------------- serialisation

    @field_serializer("logger")
    def _serialize_logger(self, value: Any) -> bool | None:
        # Logger objects are not data; _drop_non_data removes the key for them.
        return value if isinstance(value, bool) else None

    @model_serializer(mode="wrap")
    def _drop_non_data(self, handler) -> dict[str, Any]:
        data = handler(self)
        if not isinstance(self.logger, bool):
            data.pop("logger", None)
        return data

    def to_json(self) -> str:
        """All data fields as JSON (``callbacks`` and logger objects left out; see the class docstring)."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainerSpec:
        """The spec that :meth:`to_json` wrote; raises :class:`SpecError` if the JSON is not a valid spec."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise _spec_error(err) from None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainerSpec:
        """Validate ``Trainer(**kwargs)`` arguments.

        Raises :class:`SpecError` listing every problem as
        ``"field: message (got VALUE)"``; a Lightning argument raylight does not
        support says so and what to do instead, and a misspelt argument gets
        the closest valid name suggested.
        """
        try:
            return cls.model_validate(kwargs)
        except ValidationError as err:
            raise _spec_error(err) from None

    # ------------------------------------------------------------ for runtime

    def _auto_picks_this_gpu(self) -> bool:
        """``accelerator="auto"`` in the driver process (``num_workers=0``) uses this machine's GPU when it has one,
        as Lightning's does. Ray workers use GPUs only with ``use_gpu=True``: the driver cannot see their devices.
        """
        if self.accelerator != "auto" or self.num_workers > 0:
            return False
        import torch

        return torch.cuda.is_available()

    def to_run_config(self, default_root_dir: str) -> RunConfig:
        """The runtime's loop settings, with ``default_root_dir`` set to the run directory ``default_root_dir``."""
        return RunConfig(
            max_epochs=self.max_epochs,
            min_epochs=self.min_epochs,
            max_steps=self.max_steps,
            min_steps=self.min_steps,
            limit_train_batches=self.limit_train_batches,
            limit_val_batches=self.limit_val_batches,
            limit_test_batches=self.limit_test_batches,
            limit_predict_batches=self.limit_predict_batches,
            val_check_interval=self.val_check_interval,
            check_val_every_n_epoch=self.check_val_every_n_epoch,
            num_sanity_val_steps=self.num_sanity_val_steps,
            log_every_n_steps=self.log_every_n_steps,
            accumulate_grad_batches=self.accumulate_grad_batches,
            gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
            precision=self.precision,
            deterministic=self.deterministic,
            enable_checkpointing=self.enable_checkpointing,
            fast_dev_run=int(self.fast_dev_run),  # True -> 1 batch, False -> 0 (off)
            use_distributed_sampler=self.use_distributed_sampler,
            accelerator="gpu" if self.use_gpu or self._auto_picks_this_gpu() else "cpu",
            find_unused_parameters=self.strategy == "ddp_find_unused_parameters_true",
            default_root_dir=default_root_dir,
            detect_anomaly=self.detect_anomaly,
            fail_on_nonfinite_loss=self.fail_on_nonfinite_loss,
        )


def _spec_error(err: ValidationError) -> SpecError:
    """Turn pydantic's errors into one line per problem, in the user's terms."""
    fields = list(TrainerSpec.model_fields)
    problems: list[str] = []
    seen: set[str] = set()
    for e in err.errors():
        loc = e.get("loc", ())
        name = str(loc[0]) if loc else ""
        if e["type"] == "extra_forbidden" and name in _LIGHTNING_ONLY:
            problems.append(
                f"{name}: Lightning's Trainer argument {name!r} is not supported by raylight: {_LIGHTNING_ONLY[name]}"
                f" (got {_short_repr(e.get('input'))})"
            )
            continue
        if e["type"] == "extra_forbidden":
            match = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hint = f"did you mean {match[0]!r}?" if match else f"valid arguments: {', '.join(sorted(fields))}"
            problems.append(f"unknown Trainer argument {name!r} ({hint})")
            continue
        if not loc:
            problems.append(e["msg"])  # cross-field checks name every field involved
            continue
        if name in seen:  # a union reports one error per member; one line is enough
            continue
        seen.add(name)
        problems.append(f"{name}: {e['msg']} (got {_short_repr(e.get('input'))})")
    return SpecError(problems)


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

