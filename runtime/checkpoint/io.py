"""Reading and writing checkpoint files safely.

A raylight checkpoint is a ``torch.save`` dict that loads with
``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and
dicts only. This module owns the three promises made about those files:

* writes are atomic: a reader sees either the previous file or the complete
  new one, never a half-written one, even if the process dies mid-write;
* reads never execute code: files are loaded with the weights-only
  unpickler and nothing else, and a file carrying pickled objects is refused;
* every failure is a :class:`CheckpointError` that names the file, says what
  is wrong with it and how to fix it.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import secrets
import struct
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from runtime.checkpoint.durable import fsync_directory

__all__ = [
    "CheckpointError",
    "atomic_save",
    "check_state_dict_compatible",
    "check_weights_only_safe",
    "compare_state_dict",
    "load_checkpoint",
    "required_keys",
]

# How many names of each kind an error message lists before summarising.
_MAX_LISTED = 10

# Exactly these types (not subclasses: a subclass is pickled by its class
# name, which the weights-only unpickler refuses) are accepted by
# ``torch.load(weights_only=True)`` and so may appear in a checkpoint.
_SAFE_LEAF_TYPES: tuple[type, ...] = (
    str,
    bytes,
    int,
    float,
    bool,
    type(None),
    torch.Tensor,
    torch.nn.Parameter,
    torch.dtype,
    torch.Size,
    torch.device,
)
_SAFE_MAPPING_TYPES: tuple[type, ...] = (dict, collections.OrderedDict, collections.Counter)  # MultiStepLR: Counter
_SAFE_SEQUENCE_TYPES: tuple[type, ...] = (list, tuple)
_SAFE_KEY_TYPES: tuple[type, ...] = (str, int)

_SAFE_TYPES_HINT = (
    "checkpoints hold only tensors, numbers, strings, lists and dicts "
    "(with str or int keys); convert the value to one of those before saving "
    "(e.g. a state_dict() instead of the object, float(x) instead of a numpy scalar)"
)

# The zip local-file-header magic that every ``torch.save`` archive starts with.
_ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocol 2 opcode; the legacy (pre-1.6, non-zip) format starts with it.
_LEGACY_PICKLE_MAGIC = b"\x80"


class CheckpointError(RuntimeError):
    """A checkpoint file could not be written or read, or does not fit the model.

    The message names the file, says what is wrong with it and how to fix it.
    """


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def check_weights_only_safe(obj: Any, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``obj`` loads with ``weights_only=True``.

    Walks ``obj`` recursively. Containers must be ``dict`` (or
    ``OrderedDict``, as returned by ``state_dict()``) with ``str``/``int``
    keys, ``list`` or ``tuple``; leaves must be tensors, numbers, strings,
    bytes, ``None``, ``torch.dtype``, ``torch.Size`` or ``torch.device``.
    The error names the offending entry by its key path, e.g.
    ``checkpoint['callbacks']['EarlyStopping']['monitor_op']``, and its type.

    Args:
        obj: The object about to be saved.
        where: How to name the root in messages.
    """
    _check_safe(obj, where, active=set())


def _check_safe(obj: Any, where: str, active: set[int]) -> None:
    kind = type(obj)
    if kind in _SAFE_LEAF_TYPES:
        return
    if kind in _SAFE_MAPPING_TYPES or kind in _SAFE_SEQUENCE_TYPES:
        # Only the containers on the current path are tracked: the same list
        # referenced twice is fine, a list containing itself is not.
        if id(obj) in active:
            raise CheckpointError(
                f"{where} contains itself (a reference cycle); checkpoints must be "
                "trees of plain data, so copy the value instead of referencing its parent"
            )
        active.add(id(obj))
        try:
            if kind in _SAFE_MAPPING_TYPES:
                for key, value in obj.items():
                    if type(key) not in _SAFE_KEY_TYPES:
                        raise CheckpointError(
                            f"{where} has a key {key!r} of type {_type_name(key)}; "
                            f"only str and int keys are allowed: {_SAFE_TYPES_HINT}"
                        )
                    _check_safe(value, f"{where}[{key!r}]", active)
            else:
                for index, value in enumerate(obj):
                    _check_safe(value, f"{where}[{index}]", active)
        finally:
            active.discard(id(obj))
        return
    raise CheckpointError(
        f"{where} is of type {_type_name(obj)}, which torch.load(weights_only=True) "
        f"cannot read back: {_SAFE_TYPES_HINT}"
    )


def atomic_save(checkpoint: dict, path: str) -> None:
    """Write ``checkpoint`` to ``path`` so that readers never see a partial file.

    The dict is first checked with :func:`check_weights_only_safe`, then
    written with ``torch.save`` to a hidden temporary file next to ``path``,
    flushed and fsynced, and renamed over ``path`` with ``os.replace`` (atomic
    on POSIX and Windows when both names are on one filesystem, which the
    shared directory guarantees). The directory is fsynced last so the rename
    itself survives a power loss. Parent directories are created as needed.

    If anything fails, the temporary file is removed, ``path`` keeps its
    previous content, and the original exception propagates.

    Args:
        checkpoint: A dict of weights-only-safe values.
        path: Destination file; overwritten if it exists.
    """
    path = os.fspath(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"cannot save a checkpoint to {path}: expected a dict at the top level, "
            f"got {_type_name(checkpoint)}; wrap the value, e.g. {{'state_dict': value}}"
        )
    if os.path.isdir(path):
        raise CheckpointError(
            f"cannot save a checkpoint to {path}: that path is a directory; "
            "pass a file name such as os.path.join(path, 'last.ckpt')"
        )
    check_weights_only_safe(checkpoint)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Same directory as the target, so os.replace never crosses filesystems;
    # the pid and random suffix keep concurrent writers apart, and the leading
    # dot keeps the half-written file out of globs like "*.ckpt".
    tmp_path = os.path.join(
        directory,
        f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}",
    )
    try:
        with open(tmp_path, "xb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a
        # stray temp file behind either.
        _remove_quietly(tmp_path)
        _add_note(exc, f"while saving checkpoint {path}")
        raise
    fsync_directory(directory)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        # Cleanup must not mask the error that got us here.
        pass


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def load_checkpoint(path: str, map_location: Any = None, verify: bool = True) -> dict:
    """Load a checkpoint written by :func:`atomic_save` (or by Lightning).

    Always uses ``torch.load(..., weights_only=True)``: a file that contains
    pickled Python objects is refused without running any of its code, and
    there is deliberately no fallback to ``weights_only=False``.

    Args:
        path: The checkpoint file.
        map_location: Where to put the tensors, as for ``torch.load``;
            ``None`` means the CPU.
        verify: Check the archive before unpickling: the CRC-32 that
            ``torch.save`` records for every entry, and entry flags that
            would make torch read zeros. ``torch.load`` checks neither, so
            without this a flipped bit in tensor data loads silently as
            different weights. Costs one extra sequential read of the file.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: if the file is missing, unreadable, truncated or
            corrupt, contains pickled objects, or is not a dict.
    """
    path = os.fspath(path)
    _check_format(path, verify)
    if map_location is None:
        map_location = "cpu"
    elif isinstance(map_location, str):
        # Fail on a misspelt device here, before its RuntimeError could be
        # mistaken below for one about the file.
        torch.device(map_location)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        # Removed between the checks above and the load (e.g. top-k cleanup).
        raise CheckpointError(_missing_message(path)) from None
    except PermissionError as exc:
        raise CheckpointError(_permission_message(path, exc)) from None
    except pickle.UnpicklingError as exc:
        refused_global = _pickled_object_name(str(exc))
        if refused_global is not None:
            raise CheckpointError(_pickled_objects_message(path, refused_global)) from None
        raise CheckpointError(_corrupt_message(path, f"its pickle stream is invalid ({_unpickler_detail(exc)})")) from None
    except EOFError:
        raise CheckpointError(_corrupt_message(path, "reading stopped before the end of the data")) from None
    except (zipfile.BadZipFile, ValueError, TypeError, IndexError, KeyError, AssertionError, struct.error) as exc:
        # ValueError (UnicodeDecodeError included) comes from torch parsing
        # damaged archive records such as byteorder or an entry name; the
        # others from a garbled pickle stream (popping an empty stack, a memo
        # slot never stored, wrong arguments for rebuilding a tensor, and
        # torch's own internal assertions on the persistent ids).
        raise CheckpointError(_corrupt_message(path, f"its contents do not parse ({_first_line(exc) or type(exc).__name__})")) from None
    except RuntimeError as exc:
        message = str(exc)
        if "deserialize object on" in message:
            raise CheckpointError(
                f"cannot load checkpoint {path} with map_location={map_location!r}: {_first_line(exc)}; "
                "pass map_location='cpu' (or a device this machine has)"
            ) from None
        if "allocate" in message or "out of memory" in message:
            _add_note(exc, f"while loading checkpoint {path}")
            raise
        # Any other RuntimeError from loading a readable file with a valid
        # map_location comes from its contents: torch's zip reader
        # (PytorchStreamReader, inline_container) or a tensor record whose
        # size does not match its metadata.
        raise CheckpointError(_corrupt_message(path, f"torch could not read it ({_first_line(exc)})")) from None
    except OSError as exc:
        # The file exists and is readable (checked first), so an OSError from
        # torch's reader means it ran past the end of a short file.
        raise CheckpointError(_corrupt_message(path, f"reading it failed ({exc})")) from None

    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {_type_name(checkpoint)}, not a dict; raylight "
            "and Lightning checkpoints are dicts with keys like 'state_dict' and 'epoch'. "
            "If you saved it yourself, save a dict, e.g. torch.save({'state_dict': model.state_dict()}, path)"
        )
    return checkpoint


def _check_format(path: str, verify: bool) -> None:
    # Checked up front so a missing or unreadable file gets its own message,
    # and a non-torch file never reaches the unpickler.
    if os.path.isdir(path):
        raise CheckpointError(
            f"no checkpoint at {path}: that path is a directory; pass a checkpoint file "
            f"inside it{_nearby_checkpoints_hint(path)}"
        )
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_ZIP_MAGIC))
    except FileNotFoundError:
        raise CheckpointError(_missing_message(path)) from None
    except PermissionError as exc:
        raise CheckpointError(_permission_message(path, exc)) from None
    if head == _ZIP_MAGIC:
        if verify:
            _verify_archive(path)
        return
    if head.startswith(_LEGACY_PICKLE_MAGIC):
        # A pre-1.6 torch.save file: no archive to verify, torch.load reads
        # it with the same weights-only unpickler.
        return
    what = "it is empty" if not head else "it does not start with the zip header that torch.save writes"
    raise CheckpointError(_corrupt_message(path, what))


def _verify_archive(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                # torch.save never writes directories, but torch's zip reader
                # honours the MS-DOS directory bit in the central directory
                # and reads such an entry as zeros, which the CRC check below
                # cannot notice because Python's zipfile ignores that bit.
                if info.is_dir() or info.external_attr & 0x10:
                    raise zipfile.BadZipFile(f"entry {info.filename!r} is marked as a directory")
                # torch.serialization.set_crc32_options(False) records 0 for
                # every entry; there is nothing to verify against then.
                if info.CRC == 0:
                    continue
                # ZipExtFile compares the CRC-32 once the entry is read to its
                # end and raises BadZipFile on a mismatch.
                with archive.open(info) as entry:
                    while entry.read(1 << 24):
                        pass
    except PermissionError as exc:
        raise CheckpointError(_permission_message(path, exc)) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: zipfile reports a (garbled) encryption flag that way.
        raise CheckpointError(_corrupt_message(path, f"its zip archive check failed ({_first_line(exc)})")) from None


# Phrases the weights-only unpickler uses when the file asks for an object it
# will not build; anything else it raises means a garbled pickle stream.
_GLOBAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+)"),
    re.compile(r"unrecognized function (\S+)"),
    re.compile(r"but got <class '([^']+)'>"),
)
_REFUSAL_MARKERS = (
    "GLOBAL",
    "unrecognized function",
    "Can only create new object",
    "Can only build",
    "must be imported to load",
)


def _pickled_object_name(message: str) -> str | None:
    """The global the unpickler refused, '' if it named none, None if not a refusal."""
    if not any(marker in message for marker in _REFUSAL_MARKERS):
        return None
    for pattern in _GLOBAL_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return ""


def _pickled_objects_message(path: str, refused_global: str) -> str:
    named = f" (it asks for the global {refused_global!r})" if refused_global else ""
    return (
        f"refused to load checkpoint {path}: the file contains pickled Python objects{named}. "
        "raylight checkpoints are weights-only (tensors, numbers, strings, lists and dicts) "
        "and are always read with torch.load(weights_only=True); the pickled payload was NOT "
        "executed. If you wrote this file yourself, re-save it with plain data only "
        "(e.g. model.state_dict() and float hyperparameters); if you do not know where it "
        "came from, do not load it any other way."
    )


def _corrupt_message(path: str, detail: str) -> str:
    return (
        f"checkpoint {path} is truncated or corrupt: it is not a complete torch.save file "
        f"({_size_text(path)}; {detail}). It was probably cut short by a full disk, an "
        "interrupted copy or a crash of a writer that did not save atomically. Resume from "
        "the previous checkpoint instead (e.g. an epoch=N checkpoint if last.ckpt is damaged, "
        f"or last.ckpt if an epoch checkpoint is){_nearby_checkpoints_hint(path)}"
    )


def _missing_message(path: str) -> str:
    return (
        f"no checkpoint at {path}: the file does not exist; check the path "
        f"(relative paths are resolved against {os.getcwd()}){_nearby_checkpoints_hint(path)}"
    )


def _permission_message(path: str, exc: OSError) -> str:
    return (
        f"cannot read checkpoint {path}: permission denied ({exc.strerror or exc}); "
        "make the file readable by this user or copy it somewhere that is"
    )


def _nearby_checkpoints_hint(path: str) -> str:
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        names = sorted(
            name
            for name in os.listdir(directory)
            if name.endswith((".ckpt", ".pt", ".pth")) and not name.startswith(".")
            and os.path.join(directory, name) != os.path.abspath(path)
        )
    except OSError:
        return ""
    if not names:
        return ""
    return f"; checkpoints in {directory}: {_summarise(names)}"


def _size_text(path: str) -> str:
    try:
        size = os.path.getsize(path)
        return f"{size} byte{'' if size == 1 else 's'}"
    except OSError:
        return "size unknown"


# ---------------------------------------------------------------------------
# Checking contents
# ---------------------------------------------------------------------------


def compare_state_dict(
    expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """Compare the keys and tensor shapes of two state dicts.

    Args:
        expected: What the model has (``model.state_dict()``).
        loaded: What the checkpoint has.

    Returns:
        ``(missing, unexpected, mismatched)``: keys of ``expected`` absent from
        ``loaded`` (in ``expected``'s order), keys of ``loaded`` absent from
        ``expected`` (in ``loaded``'s order), and ``(key, expected_shape,
        loaded_shape)`` for tensors present in both with different shapes.
        Non-tensor values (e.g. ``_extra_state``) are not shape-checked.
    """
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    mismatched = []
    for key, want in expected.items():
        if key not in loaded:
            continue
        got = loaded[key]
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape != got.shape:
            mismatched.append((key, tuple(want.shape), tuple(got.shape)))
    return missing, unexpected, mismatched


def check_state_dict_compatible(
    module_state: Mapping[str, torch.Tensor],
    loaded_state: Mapping[str, torch.Tensor],
    path: str,
    strict: bool = True,
) -> None:
    """Raise :class:`CheckpointError` if ``loaded_state`` does not fit the model.

    Call before ``model.load_state_dict`` so the user gets one message with
    every difference and the likely cause, instead of torch's error.

    Args:
        module_state: ``model.state_dict()`` of the model being restored.
        loaded_state: The checkpoint's ``state_dict``.
        path: The checkpoint file, for the message.
        strict: If False, missing and unexpected keys are allowed (as in
            ``load_state_dict(strict=False)``); shape mismatches never are,
            because no tensor can be copied into a parameter of another shape.
    """
    missing, unexpected, mismatched = compare_state_dict(module_state, loaded_state)
    if not strict:
        missing, unexpected = [], []
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (in the model, not in the checkpoint): {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not in the model): {_summarise(unexpected)}")
    if mismatched:
        shown = [
            f"{key} checkpoint {_shape_text(got)} vs model {_shape_text(want)}" for key, want, got in mismatched
        ]
        problems.append(f"{len(mismatched)} shape mismatch(es): {_summarise(shown)}")
    fix = (
        "Did the model's architecture or hyperparameters change since the checkpoint was saved? "
        "Build the model with the same hyperparameters as the run that wrote it "
        "(load_from_checkpoint restores the saved ones unless you override them)"
    )
    if missing or unexpected:
        fix += ", or pass strict=False where supported to load only the keys that match"
    raise CheckpointError(f"checkpoint {path} does not match the model: {'; '.join(problems)}. {fix}.")


def required_keys(checkpoint: Mapping[str, Any], keys: Iterable[str], path: str) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` has all top-level ``keys``.

    Args:
        checkpoint: The loaded checkpoint dict.
        keys: Top-level keys the caller needs, e.g. ``("state_dict",)``.
        path: The checkpoint file, for the message.
    """
    absent = [key for key in keys if key not in checkpoint]
    if not absent:
        return
    present = [str(key) for key in checkpoint]
    message = (
        f"checkpoint {path} is missing required key(s) {_summarise([repr(k) for k in absent])} "
        f"(it has: {_summarise(present) if present else 'no keys'}); it is not a raylight/Lightning "
        "checkpoint, which holds 'state_dict', 'epoch', 'global_step' and the loop state"
    )
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        message += (
            ". It looks like a bare model state_dict (torch.save(model.state_dict(), path)): "
            "load it with model.load_state_dict(torch.load(path, weights_only=True)) instead"
        )
    else:
        message += ". Pass a checkpoint written by ModelCheckpoint or trainer.save_checkpoint"
    raise CheckpointError(message)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _summarise(items: list[str]) -> str:
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more, {len(items)} in total)"
    return shown


def _shape_text(shape: tuple) -> str:
    # (10,) rather than (10) and () for scalars, as Python prints tuples.
    return repr(tuple(shape))


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _unpickler_detail(exc: BaseException) -> str:
    # torch wraps the unpickler's own one-line reason between boilerplate
    # about weights_only; keep only the reason.
    text = str(exc).split("\n\nCheck the documentation")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1].replace("WeightsUnpickler error:", "").strip() or lines[-1]


def _add_note(exc: BaseException, note: str) -> None:
    # BaseException.add_note exists from Python 3.11; on 3.10 the traceback
    # still shows the failing call, just without the path.
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
