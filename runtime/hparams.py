"""``save_hyperparameters``: capture a module's ``__init__`` arguments."""

from __future__ import annotations

import copy
import inspect
import warnings
from types import FrameType
from typing import Any, Iterable

import torch


class AttributeDict(dict):
    """A dict whose keys are also attributes (``self.hparams.lr``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"hyperparameter {key!r} was not saved; saved: {sorted(self)}") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        del self[key]


def _frame_init_args(frame: FrameType) -> dict[str, Any]:
    info = inspect.getargvalues(frame)
    args = {name: info.locals[name] for name in info.args if name not in ("self", "__class__")}
    if info.keywords and isinstance(info.locals.get(info.keywords), dict):
        args.update(info.locals[info.keywords])
    return args


def collect_init_args(obj: Any, start: FrameType) -> dict[str, Any]:
    """Arguments of every ``__init__`` on the call stack that belongs to ``obj``.

    Walks outwards from ``start`` (past methods of ``obj`` that ``__init__``
    called, as Lightning does) so that a subclass's ``__init__`` (further
    out) overrides what a base class's ``__init__`` received through super().
    """
    collected: list[dict[str, Any]] = []
    frame: FrameType | None = start
    while frame is not None and frame.f_code.co_name != "__init__" and frame.f_locals.get("self") is obj:
        frame = frame.f_back  # a method of obj that __init__ called save_hyperparameters from
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
        collected.append(_frame_init_args(frame))
        frame = frame.f_back
    merged: dict[str, Any] = {}
    for args in collected:
        merged.update(args)
    return merged


def hparams_name(init_args: dict[str, Any], names: tuple[Any, ...]) -> str | None:
    """How ``load_from_checkpoint`` passes the saved hyperparameters back to ``__init__`` (Lightning's rule).

    ``"kwargs"``: as keyword arguments. The name of an ``__init__`` argument: that argument was one dict or
    Namespace given to ``save_hyperparameters(config)``, and receives the saved dict. None: a dict that was
    not an ``__init__`` argument.
    """
    given = [n for n in names if not isinstance(n, str)]
    if len(given) != 1:
        return "kwargs" if (names or init_args) else None
    return next((name for name, value in init_args.items() if value is given[0]), None)


def select_hparams(
    init_args: dict[str, Any], names: tuple[Any, ...], ignore: Iterable[str] | str | None
) -> dict[str, Any]:
    """Apply ``save_hyperparameters(*names, ignore=...)`` to the captured init args."""
    if len(names) == 1 and not isinstance(names[0], str):
        given = names[0]
        hparams = dict(vars(given)) if not isinstance(given, dict) else dict(given)
    elif names:
        unknown = [n for n in names if n not in init_args]
        if unknown:
            raise ValueError(
                f"save_hyperparameters{names}: {unknown} are not arguments of __init__ "
                f"(its arguments are {sorted(init_args)}); pass argument names, or a dict"
            )
        hparams = {n: init_args[n] for n in names}
    else:
        hparams = dict(init_args)
    ignored = [ignore] if isinstance(ignore, str) else list(ignore or [])
    for name in ignored:
        hparams.pop(name, None)
    for name, value in hparams.items():
        if isinstance(value, torch.nn.Module):
            warnings.warn(
                f"hyperparameter {name!r} is an nn.Module; its weights are already in the checkpoint's state_dict "
                f"and it cannot be stored as a hyperparameter. Use save_hyperparameters(ignore=[{name!r}]).",
                stacklevel=3,
            )
    return hparams


_SAFE_SCALARS = (str, int, float, bool, type(None))


def _is_weights_only_safe(value: Any) -> bool:
    if isinstance(value, _SAFE_SCALARS) or isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_weights_only_safe(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_weights_only_safe(v) for k, v in value.items())
    return False


def checkpointable_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters that a weights-only checkpoint can hold.

    Anything else (a backbone module, a tokenizer object) is left out with a
    warning: checkpoints never contain pickled objects, so such an argument
    has to be passed again to ``load_from_checkpoint``.
    """
    kept: dict[str, Any] = {}
    for name, value in hparams.items():
        if _is_weights_only_safe(value):
            kept[name] = copy.deepcopy(value)
        else:
            warnings.warn(
                f"hyperparameter {name!r} of type {type(value).__name__} is not saved in the checkpoint "
                "(checkpoints hold only tensors, numbers, strings, lists and dicts); pass it again to "
                f"load_from_checkpoint(..., {name}=...) or exclude it with save_hyperparameters(ignore=[{name!r}])",
                stacklevel=2,
            )
    return kept


def _same_hparam(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a is b  # tensors compare elementwise; Lightning accepts only the very same tensor
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values whose == is not a plain bool (arrays) must be the same object
        return a is b


def hparams_for_loggers(module: Any, datamodule: Any = None) -> dict[str, Any] | None:
    """The hyperparameters the loggers receive when fit starts (None: nothing to log), as Lightning picks them.

    Those saved with ``save_hyperparameters()`` (``logger=True``, the default) on the module and on the
    datamodule, as they were when saved, merged into one dict. A key both saved with different values is
    an error: which one the loggers should show cannot be told.
    """
    from_module = bool(getattr(module, "_log_hyperparams", False))
    from_datamodule = datamodule is not None and bool(getattr(datamodule, "_log_hyperparams", False))
    if from_module and from_datamodule:
        ours, theirs = module.hparams_initial, datamodule.hparams_initial
        clashing = sorted(k for k in ours.keys() & theirs.keys() if not _same_hparam(ours[k], theirs[k]))
        if clashing:
            values = ", ".join(f"{k!r}: {ours[k]!r} in the module, {theirs[k]!r} in the datamodule" for k in clashing)
            raise RuntimeError(
                f"the LightningModule's and the LightningDataModule's hyperparameters cannot be merged for the "
                f"loggers: {values}. Give them different names, or leave one out with "
                "save_hyperparameters(ignore=[...]) or save_hyperparameters(logger=False)"
            )
        return {**ours, **theirs}
    if from_module:
        return dict(module.hparams_initial)
    if from_datamodule:
        return dict(datamodule.hparams_initial)
    return None
