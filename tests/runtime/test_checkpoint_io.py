"""Checkpoint files: atomic writes, weights-only reads, and the errors users see."""

from __future__ import annotations

import collections
import errno
import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.checkpoint import io as ckpt_io
from runtime.checkpoint.io import (
    CheckpointError,
    atomic_save,
    check_state_dict_compatible,
    check_weights_only_safe,
    compare_state_dict,
    load_checkpoint,
    required_keys,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "state_dict": collections.OrderedDict(
            [
                ("layer.weight", torch.randn(16, 8, generator=generator)),
                ("layer.bias", torch.randn(16, generator=generator)),
                ("steps", torch.tensor(seed)),
            ]
        ),
        "epoch": seed,
        "global_step": 10 * seed,
        "hyper_parameters": {"lr": 0.1, "name": "mlp", "sizes": (8, 16), "dropout": None, "bias": True},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "meta": {"dtype": torch.float16, "shape": torch.Size([2, 3]), "device": torch.device("cpu"), "tag": b"raw"},
    }


def assert_same_checkpoint(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert actual["state_dict"].keys() == expected["state_dict"].keys()
    for key, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], tensor), key
    assert actual["epoch"] == expected["epoch"]
    assert actual["global_step"] == expected["global_step"]
    assert actual["hyper_parameters"] == expected["hyper_parameters"]
    assert actual["meta"] == expected["meta"]
    assert torch.equal(
        actual["optimizer_states"][0]["state"][0]["step"], expected["optimizer_states"][0]["state"][0]["step"]
    )


def entry_data_offset(path: Path, suffix: str) -> tuple[int, int]:
    """Byte offset and size of the stored bytes of the archive entry ending in ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_len = int.from_bytes(handle.read(2), "little")
        extra_len = int.from_bytes(handle.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def central_entry_offset(path: Path, suffix: str) -> int:
    """Byte offset of the central-directory record of the entry ending in ``suffix``."""
    data = path.read_bytes()
    offset = data.find(b"PK\x01\x02")
    while offset != -1:
        name_len = int.from_bytes(data[offset + 28 : offset + 30], "little")
        if data[offset + 46 : offset + 46 + name_len].decode().endswith(suffix):
            return offset
        offset = data.find(b"PK\x01\x02", offset + 4)
    raise AssertionError(f"no central directory entry ending in {suffix}")


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# atomic_save
# ---------------------------------------------------------------------------


def test_atomic_save_writes_a_weights_only_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "nested" / "dir" / "last.ckpt"
    checkpoint = make_checkpoint(1)

    atomic_save(checkpoint, str(path))

    assert os.listdir(path.parent) == ["last.ckpt"]
    assert_same_checkpoint(torch.load(path, weights_only=True), checkpoint)
    assert_same_checkpoint(load_checkpoint(str(path)), checkpoint)


def test_atomic_save_overwrites_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    atomic_save(make_checkpoint(2), str(path))

    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert_same_checkpoint(load_checkpoint(str(path)), make_checkpoint(2))


def test_failure_mid_write_keeps_the_previous_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    real_save = torch.save

    def save_half_then_fail(obj, handle, *args, **kwargs):
        buffer = __import__("io").BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", save_half_then_fail)

    with pytest.raises(OSError, match="No space left on device"):
        atomic_save(make_checkpoint(2), str(path))

    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert_same_checkpoint(load_checkpoint(str(path)), make_checkpoint(1))


def _commit_by(how: str, checkpoint: dict, path: Path) -> None:
    """Commit ``checkpoint`` to ``path`` the way the runtime does in one process, or the driver's sink actor on Ray."""
    if how == "atomic_save":
        atomic_save(checkpoint, str(path))
        return
    from launcher.ray.driver_sink import DriverSink

    tmp = path.parent / f".{path.name}.written-test"
    torch.save(checkpoint, tmp)  # what a worker on the driver's node writes in place
    DriverSink(str(path.parent), [], None, None).commit_written(str(tmp), str(path))


@pytest.mark.parametrize("how", ["atomic_save", "driver sink"])
def test_a_filesystem_that_cannot_fsync_a_directory_still_gets_the_checkpoint(tmp_path, monkeypatch, how):
    # Some FUSE and network mounts answer fsync on a directory with EINVAL: the rename is atomic there all
    # the same, so the commit goes on; any other error (EIO: the disk failed) still fails the save.
    real_fsync = os.fsync
    refusal = {"errno": errno.EINVAL}

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(refusal["errno"], os.strerror(refusal["errno"]))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "last.ckpt"
    _commit_by(how, make_checkpoint(1), path)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert_same_checkpoint(load_checkpoint(str(path)), make_checkpoint(1))

    refusal["errno"] = errno.EIO
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        _commit_by(how, make_checkpoint(2), path)


def _resident_fraction(path: Path) -> float:
    """The part of ``path``'s pages in the page cache (``mincore`` on a read-only mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vector) / pages
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not sys.platform.startswith("linux"), reason="Linux page cache")
@pytest.mark.parametrize("way", ["streamed", "in place"])
def test_a_committed_checkpoint_leaves_the_driver_nodes_page_cache(tmp_path, way):
    # A run that keeps every checkpoint must not pile them up in the driver node's memory: once a file is
    # on disk, its pages go back to the kernel (and the next checkpoint is written into them).
    from launcher.ray.driver_sink import WRITEBACK_BYTES, DriverSink

    weights = torch.arange(3 * WRITEBACK_BYTES // 2 // 4, dtype=torch.float32)  # past the streamed write-back step
    checkpoint = {"state_dict": {"w": weights}, "global_step": 7}
    control = tmp_path / "control.ckpt"  # the same file, written and fsynced by plain means
    with open(control, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    assert _resident_fraction(control) > 0.9, "a file just written is in the page cache"
    fd = os.open(control, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_fraction(control) > 0.5:
        pytest.skip(f"{tmp_path} keeps files in memory (tmpfs?): its page cache is the storage")

    sink = DriverSink(str(tmp_path), [], None, None)
    path = tmp_path / "checkpoints" / "epoch=0-step=7.ckpt"
    if way == "streamed":
        token = sink.upload_begin(str(path))
        data = control.read_bytes()
        for start in range(0, len(data), 8 << 20):
            sink.upload_chunk(token, np.frombuffer(data, dtype=np.uint8)[start : start + (8 << 20)])
        sink.upload_commit(token, True, {"epoch": 0, "global_step": 7})
    else:
        path.parent.mkdir()
        tmp = path.parent / f".{path.name}.written-test"
        torch.save(checkpoint, tmp)  # what a worker on the driver's node writes in place
        sink.commit_written(str(tmp), str(path), True, {"epoch": 0, "global_step": 7})

    assert _resident_fraction(path) < 0.1
    assert sink.latest_checkpoint() == str(path)
    loaded = load_checkpoint(str(path))
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], weights)


@pytest.mark.skipif(sys.platform == "win32", reason="uses SIGKILL")
def test_process_killed_mid_write_keeps_the_previous_file_readable(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    # A real crash: the writer is SIGKILLed with half the new file on disk, so
    # no cleanup code runs at all.
    script = textwrap.dedent(
        f"""
        import io, os, signal, sys, torch
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from runtime.checkpoint import io as ckpt_io
        real_save = torch.save
        def save_half_then_die(obj, handle, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt_io.torch.save = save_half_then_die
        ckpt_io.atomic_save({{"state_dict": {{"w": torch.zeros(1000)}}, "epoch": 99}}, {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()

    assert_same_checkpoint(load_checkpoint(str(path)), make_checkpoint(1))
    leftovers = [name for name in os.listdir(tmp_path) if name != "last.ckpt"]
    # The half-written temp file stays (nothing could remove it) but is hidden
    # and never has the checkpoint's name.
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.tmp-")


def test_atomic_save_refuses_unsafe_objects_naming_the_key_path(tmp_path):
    path = tmp_path / "last.ckpt"

    class Threshold:
        pass

    checkpoint = {"state_dict": {}, "callbacks": {"EarlyStopping": {"patience": 3, "foo": Threshold()}}}
    with pytest.raises(CheckpointError) as info:
        atomic_save(checkpoint, str(path))

    message = str(info.value)
    assert "checkpoint['callbacks']['EarlyStopping']['foo']" in message
    assert "Threshold" in message
    assert "tensors, numbers, strings, lists and dicts" in message
    assert not path.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("value", "where", "type_name"),
    [
        ({"a": [1, {"b": object()}]}, "checkpoint['a'][1]['b']", "object"),
        ({"lr": np.float64(0.1)}, "checkpoint['lr']", "numpy.float64"),
        ({"ids": {1, 2}}, "checkpoint['ids']", "set"),
        ({"fn": len}, "checkpoint['fn']", "builtin_function_or_method"),
    ],
)
def test_check_weights_only_safe_names_path_and_type(value, where, type_name):
    with pytest.raises(CheckpointError) as info:
        check_weights_only_safe(value)
    assert where in str(info.value)
    assert type_name in str(info.value)


def test_check_weights_only_safe_rejects_bad_keys_and_cycles():
    with pytest.raises(CheckpointError, match=r"checkpoint\['m'\] has a key \(1, 2\) of type tuple"):
        check_weights_only_safe({"m": {(1, 2): 0}})
    looped: list = []
    looped.append(looped)
    with pytest.raises(CheckpointError, match="reference cycle"):
        check_weights_only_safe({"x": looped})
    shared = [1, 2]
    check_weights_only_safe({"a": shared, "b": shared})  # shared, not cyclic: fine


def test_atomic_save_requires_a_dict_and_a_file_path(tmp_path):
    with pytest.raises(CheckpointError, match="expected a dict at the top level, got list"):
        atomic_save([1, 2], str(tmp_path / "x.ckpt"))
    with pytest.raises(CheckpointError, match="is a directory"):
        atomic_save({"a": 1}, str(tmp_path))


# ---------------------------------------------------------------------------
# load_checkpoint
# ---------------------------------------------------------------------------


def test_missing_file_names_the_path_and_lists_nearby_checkpoints(tmp_path):
    atomic_save(make_checkpoint(1), str(tmp_path / "epoch=1.ckpt"))
    missing = tmp_path / "last.ckpt"

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(missing))

    message = str(info.value)
    assert f"no checkpoint at {missing}" in message
    assert "epoch=1.ckpt" in message


@pytest.mark.parametrize("keep", [0, 3, 10, 0.5, -22, -1])
def test_truncated_file_raises_naming_the_path(tmp_path, keep):
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    atomic_save(make_checkpoint(0), str(tmp_path / "epoch=0.ckpt"))
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path.write_bytes(data[:cut])

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))

    message = str(info.value)
    assert str(path) in message
    assert "truncated or corrupt" in message
    assert "previous checkpoint" in message
    assert "epoch=0.ckpt" in message  # the one to fall back to


@pytest.mark.parametrize("region", ["pickle", "tensor data"])
def test_flipped_byte_raises_instead_of_loading_wrong_weights(tmp_path, region):
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    suffix = "data.pkl" if region == "pickle" else "data/0"
    offset, size = entry_data_offset(path, suffix)
    flip_byte(path, offset + size // 2, mask=0x01)

    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value)


def test_directory_bit_in_the_zip_index_is_caught(tmp_path):
    # torch's reader treats an entry flagged as a directory as empty and
    # loads zeros; a user would see a model that silently lost its weights.
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    flip_byte(path, central_entry_offset(path, "data/0") + 38, mask=0x10)  # "external attributes"

    with pytest.raises(CheckpointError, match="marked as a directory"):
        load_checkpoint(str(path))


def test_no_single_byte_flip_yields_a_different_checkpoint(tmp_path):
    # Whatever byte is damaged, a user gets either the exact checkpoint
    # (the byte was padding or unused metadata) or a CheckpointError.
    expected = {"state_dict": {"w": torch.arange(24.0).reshape(4, 6)}, "epoch": 7, "name": "run"}
    path = tmp_path / "good.ckpt"
    atomic_save(expected, str(path))
    data = path.read_bytes()
    damaged = tmp_path / "damaged.ckpt"
    outcomes = collections.Counter()
    for offset in range(0, len(data), 3):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0xFF
        damaged.write_bytes(bytes(corrupted))
        try:
            loaded = load_checkpoint(str(damaged))
        except CheckpointError:
            outcomes["error"] += 1
            continue
        assert loaded.keys() == expected.keys(), offset
        assert torch.equal(loaded["state_dict"]["w"], expected["state_dict"]["w"]), offset
        assert (loaded["epoch"], loaded["name"]) == (7, "run"), offset
        outcomes["same"] += 1
    assert outcomes["error"] > 0


class _TouchOnUnpickle:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for malicious code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "x": _TouchOnUnpickle(marker)}, path)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))

    message = str(info.value)
    assert str(path) in message
    assert "pickled Python objects" in message
    assert "'io.open'" in message  # the global the file asked for (open pickles as io.open)
    assert "NOT executed" in message
    assert not marker.exists()

    # Control: the payload is real, plain unpickling does run it.
    control_marker = tmp_path / "control-ran"
    control = tmp_path / "control.ckpt"
    torch.save({"x": _TouchOnUnpickle(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


class PickledHyperparameters:
    def __init__(self):
        self.lr = 0.1


def test_pickled_class_instance_is_refused_naming_the_class(tmp_path):
    path = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": PickledHyperparameters()}, path)

    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        load_checkpoint(str(path))
    assert "PickledHyperparameters" in str(info.value)


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a dict") as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value)


def test_non_torch_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="does not start with the zip header"):
        load_checkpoint(str(path))


def test_directory_instead_of_file(tmp_path):
    atomic_save(make_checkpoint(1), str(tmp_path / "last.ckpt"))
    with pytest.raises(CheckpointError, match="is a directory.*last.ckpt"):
        load_checkpoint(str(tmp_path))


def test_legacy_format_and_map_location(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(str(path))["state_dict"]["w"], torch.ones(3))

    atomic_save(make_checkpoint(1), str(tmp_path / "meta.ckpt"))
    on_meta = load_checkpoint(str(tmp_path / "meta.ckpt"), map_location="meta")
    assert on_meta["state_dict"]["layer.weight"].device.type == "meta"


def test_never_falls_back_to_unsafe_loading(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save(make_checkpoint(1), str(path))
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt_io.torch, "load", recording_load)
    load_checkpoint(str(path))
    torch.save({"x": PickledHyperparameters()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
    assert calls == [True, True]


# ---------------------------------------------------------------------------
# State dict checks
# ---------------------------------------------------------------------------


def test_compare_state_dict_reports_missing_unexpected_and_shapes():
    model = {"fc.weight": torch.zeros(10, 32), "fc.bias": torch.zeros(10), "head.weight": torch.zeros(2, 10)}
    loaded = {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10), "extra.weight": torch.zeros(1)}

    missing, unexpected, mismatched = compare_state_dict(model, loaded)

    assert missing == ["head.weight"]
    assert unexpected == ["extra.weight"]
    assert mismatched == [("fc.weight", (10, 32), (10, 64))]
    assert compare_state_dict(model, dict(model)) == ([], [], [])


def test_check_state_dict_compatible_message_lists_every_kind():
    model = {"fc.weight": torch.zeros(10, 32), "head.weight": torch.zeros(2, 10)}
    loaded = {"fc.weight": torch.zeros(10, 64), "extra.weight": torch.zeros(1)}

    with pytest.raises(CheckpointError) as info:
        check_state_dict_compatible(model, loaded, "/runs/a/last.ckpt")

    message = str(info.value)
    assert "/runs/a/last.ckpt" in message
    assert "missing key(s) (in the model, not in the checkpoint): head.weight" in message
    assert "unexpected key(s) (in the checkpoint, not in the model): extra.weight" in message
    assert "fc.weight checkpoint (10, 64) vs model (10, 32)" in message
    assert "hyperparameters" in message and "strict=False" in message


def test_check_state_dict_compatible_summarises_long_lists():
    model = {f"layers.{i}.weight": torch.zeros(1) for i in range(25)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict_compatible(model, {}, "x.ckpt")
    message = str(info.value)
    assert "25 missing key(s)" in message
    assert "layers.9.weight" in message and "layers.10.weight" not in message
    assert "15 more, 25 in total" in message


def test_check_state_dict_compatible_non_strict_still_rejects_shapes():
    model = {"a": torch.zeros(2), "b": torch.zeros(3)}
    check_state_dict_compatible(model, {"a": torch.zeros(2), "c": torch.zeros(1)}, "x.ckpt", strict=False)
    with pytest.raises(CheckpointError, match=r"a checkpoint \(4,\) vs model \(2,\)"):
        check_state_dict_compatible(model, {"a": torch.zeros(4)}, "x.ckpt", strict=False)
    check_state_dict_compatible(model, dict(model), "x.ckpt")


def test_required_keys_explains_what_the_file_is():
    with pytest.raises(CheckpointError) as info:
        required_keys({"layer.weight": torch.zeros(1)}, ["state_dict"], "model.pt")
    message = str(info.value)
    assert "model.pt" in message and "'state_dict'" in message
    assert "not a raylight/Lightning checkpoint" in message
    assert "bare model state_dict" in message

    with pytest.raises(CheckpointError, match="'optimizer_states', 'loops'"):
        required_keys({"state_dict": {}, "epoch": 1}, ["state_dict", "optimizer_states", "loops"], "x.ckpt")
    required_keys({"state_dict": {}}, ["state_dict"], "x.ckpt")
