"""TrainerSpec: Lightning-compatible validation, aliases, JSON round trip, RunConfig mapping."""

from __future__ import annotations

import pickle
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from launcher.loggers import CSVLogger, TensorBoardLogger
from launcher.spec import SpecError, TrainerSpec, new_run_name
from runtime.callbacks.base import Callback
from runtime.config import RunConfig


def _problems(**kwargs) -> str:
    with pytest.raises(SpecError) as info:
        TrainerSpec.from_kwargs(**kwargs)
    return str(info.value)


# Each case: kwargs, the field the message must name, the value it must repeat,
# and a fragment of "what is allowed".
INVALID = [
    ({"max_epochs": -2}, "max_epochs", "-2", "int >= -1"),
    ({"max_epochs": 2.5}, "max_epochs", "2.5", "int >= -1"),
    ({"min_epochs": -1}, "min_epochs", "-1", "int >= 0"),
    ({"max_steps": -2}, "max_steps", "-2", "int >= -1"),
    ({"min_steps": -3}, "min_steps", "-3", "int >= 0"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches", "0", "int >= 1"),
    ({"accumulate_grad_batches": -4}, "accumulate_grad_batches", "-4", "int >= 1"),
    ({"precision": "fp8"}, "precision", "'fp8'", "'bf16-mixed'"),
    ({"precision": "16-true"}, "precision", "'16-true'", "'32-true'"),
    ({"precision": 8}, "precision", "8", "'16-mixed'"),
    ({"gradient_clip_algorithm": "l2"}, "gradient_clip_algorithm", "'l2'", "'norm' or 'value'"),
    ({"gradient_clip_val": -0.5}, "gradient_clip_val", "-0.5", ">= 0"),
    ({"limit_train_batches": 1.5}, "limit_train_batches", "1.5", "[0.0, 1.0]"),
    ({"limit_val_batches": -1}, "limit_val_batches", "-1", "int >= 0"),
    ({"limit_test_batches": True}, "limit_test_batches", "True", "int >= 0"),
    ({"limit_predict_batches": -0.1}, "limit_predict_batches", "-0.1", "[0.0, 1.0]"),
    ({"val_check_interval": 0}, "val_check_interval", "0", "int >= 1"),
    ({"val_check_interval": 0.0}, "val_check_interval", "0.0", "(0.0, 1.0]"),
    ({"val_check_interval": 1.5}, "val_check_interval", "1.5", "(0.0, 1.0]"),
    ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch", "0", "int >= 1 or None"),
    ({"num_sanity_val_steps": -2}, "num_sanity_val_steps", "-2", "int >= -1"),
    ({"log_every_n_steps": -1}, "log_every_n_steps", "-1", "int >= 0"),
    ({"num_workers": -1}, "num_workers", "-1", "int >= 0"),
    ({"max_failures": -2}, "max_failures", "-2", "int >= -1"),
    ({"resources_per_worker": {"CPU": -1}}, "resources_per_worker", "{'CPU': -1}", "amount > 0"),
    ({"resources_per_worker": {"GPU": 0}}, "resources_per_worker", "{'GPU': 0}", "amount > 0"),
    ({"resources_per_worker": {}}, "resources_per_worker", "{}", "pass None for Ray Train's default"),
    ({"run_name": "my run"}, "run_name", "'my run'", "letters, digits"),
    ({"run_name": ".hidden"}, "run_name", "'.hidden'", "not starting with '.'"),
    ({"run_name": "a/b"}, "run_name", "'a/b'", "letters, digits"),
    ({"fast_dev_run": -1}, "fast_dev_run", "-1", "int >= 0"),
    ({"placement_strategy": "pack"}, "placement_strategy", "'pack'", "'PACK'"),
    ({"accelerator": "mps"}, "accelerator", "'mps'", "'cpu'"),
    ({"devices": -1}, "devices", "-1", "'auto' or an int >= 1"),
    ({"devices": [0, 1]}, "devices", "[0, 1]", "'auto' or an int >= 1"),
    ({"deterministic": "yes"}, "deterministic", "'yes'", "a boolean or 'warn'"),
    ({"default_root_dir": ""}, "default_root_dir", "''", "non-empty path"),
    ({"address": ""}, "address", "''", "Ray address"),
    ({"strategy": "fsdp"}, "strategy", "'fsdp'", "'ddp_find_unused_parameters_true'"),
    ({"address": "ray://head:10001"}, "address", "'ray://head:10001'", "raylight submit --address http://HEAD:8265"),
    # Values that slip past a plain type check: bools where counts go, NaN and infinity, floats for counts.
    ({"num_workers": 2.5}, "num_workers", "2.5", "int >= 0"),
    ({"num_workers": True}, "num_workers", "True", "int >= 0"),
    ({"max_failures": 1.5}, "max_failures", "1.5", "int >= -1"),
    ({"max_failures": "forever"}, "max_failures", "'forever'", "-1 = restart forever"),
    ({"check_val_every_n_epoch": -1}, "check_val_every_n_epoch", "-1", "int >= 1 or None"),
    ({"log_every_n_steps": 1.5}, "log_every_n_steps", "1.5", "int >= 0"),
    ({"accumulate_grad_batches": 2.0}, "accumulate_grad_batches", "2.0", "int >= 1"),
    ({"accumulate_grad_batches": {0: 2}}, "accumulate_grad_batches", "{0: 2}", "int >= 1"),
    ({"gradient_clip_val": float("inf")}, "gradient_clip_val", "inf", "finite number >= 0"),
    ({"gradient_clip_val": float("nan")}, "gradient_clip_val", "nan", "finite number >= 0"),
    ({"limit_train_batches": float("nan")}, "limit_train_batches", "nan", "[0.0, 1.0]"),
    ({"val_check_interval": float("inf")}, "val_check_interval", "inf", "(0.0, 1.0]"),
    ({"resources_per_worker": {"CPU": True}}, "resources_per_worker", "{'CPU': True}", "amount > 0"),
    ({"resources_per_worker": [("CPU", 1)]}, "resources_per_worker", "[('CPU', 1)]", "dict of resource name"),
    ({"placement_strategy": None}, "placement_strategy", "None", "'STRICT_SPREAD'"),
    ({"gradient_clip_algorithm": "max"}, "gradient_clip_algorithm", "'max'", "'norm' or 'value'"),
    ({"collective_timeout_s": 0}, "collective_timeout_s", "0", "positive number of seconds"),
    ({"resource_wait_s": float("inf")}, "resource_wait_s", "inf", "positive number of seconds"),
]


@pytest.mark.parametrize(("kwargs", "field", "value", "allowed"), INVALID, ids=[c[1] + "=" + c[2] for c in INVALID])
def test_invalid_value_names_field_value_and_allowed(kwargs, field, value, allowed):
    message = _problems(**kwargs)
    assert f"{field}:" in message
    assert f"(got {value})" in message
    assert allowed in message


def test_unknown_argument_suggests_closest_name():
    message = _problems(max_epoch=3)
    assert "unknown Trainer argument 'max_epoch' (did you mean 'max_epochs'?)" in message


def test_unknown_argument_without_close_match_lists_valid_names():
    message = _problems(zzz_qqq=1)
    assert "unknown Trainer argument 'zzz_qqq'" in message
    assert "max_epochs" in message and "num_workers" in message


# Lightning Trainer arguments raylight lacks: each message says so and gives the fix, never a raylight argument
# with another meaning (difflib proposed num_nodes -> num_workers, max_time -> max_steps, ...).
LIGHTNING_ONLY = [
    ({"barebones": True}, "enable_progress_bar=False"),
    ({"benchmark": True}, "torch.backends.cudnn.benchmark = True"),
    ({"enable_autolog_hparams": False}, "save_hyperparameters(logger=False)"),
    ({"inference_mode": False}, "torch.no_grad()"),
    ({"max_time": "00:12:00:00"}, "max_epochs or max_steps"),
    ({"model_registry": "my-model"}, "checkpoints"),
    ({"overfit_batches": 10}, "limit_train_batches=N"),
    ({"plugins": []}, "precision="),
    ({"profiler": "simple"}, "torch.profiler"),
    ({"reload_dataloaders_every_n_epochs": 1}, "once per fit"),
    ({"sync_batchnorm": True}, "convert_sync_batchnorm"),
]


@pytest.mark.parametrize(("kwargs", "fix"), LIGHTNING_ONLY, ids=[next(iter(c[0])) for c in LIGHTNING_ONLY])
def test_lightning_only_argument_is_named_unsupported_with_the_fix(kwargs, fix):
    ((name, value),) = kwargs.items()
    with pytest.raises(SpecError) as info:
        TrainerSpec.from_kwargs(**kwargs)
    (problem,) = info.value.problems
    assert problem.startswith(f"{name}: Lightning's Trainer argument {name!r} is not supported by raylight")
    assert fix in problem and f"(got {value!r})" in problem
    assert "did you mean" not in problem and "\n" not in problem


def test_num_nodes_1_and_enable_model_summary_are_accepted_and_change_nothing():
    default = TrainerSpec()
    for kwargs in ({"num_nodes": 1}, {"enable_model_summary": False}, {"enable_model_summary": True},
                   {"enable_model_summary": None}, {"num_nodes": 1, "enable_model_summary": False}):
        spec = TrainerSpec.from_kwargs(**kwargs)
        assert spec.num_workers == 0, "an in-process run stays in-process"
        assert spec.to_run_config("/r") == default.to_run_config("/r"), kwargs
        assert TrainerSpec.from_json(spec.to_json()) == spec
    assert TrainerSpec.from_kwargs(num_nodes=1, num_workers=4).num_workers == 4
    assert "enable_model_summary:" in _problems(enable_model_summary="yes")


def test_num_nodes_above_1_explains_that_ray_places_num_workers():
    (problem,) = _problems_list(num_nodes=2)
    assert problem.startswith("num_nodes: ") and problem.endswith("(got 2)")
    assert "Ray places the num_workers workers across the cluster's nodes" in problem
    assert "num_workers=<total workers>" in problem and "did you mean" not in problem


def _problems_list(**kwargs) -> tuple[str, ...]:
    with pytest.raises(SpecError) as info:
        TrainerSpec.from_kwargs(**kwargs)
    return info.value.problems


# Lightning 2.6.6's signature defaults each of these to None and resolves it to these values
# (pl.Trainer(**{name: None}) gives precision '32-true', log_every_n_steps 50, ...).
NONE_MEANS_DEFAULT = {
    "precision": "32-true",
    "log_every_n_steps": 50,
    "num_sanity_val_steps": 2,
    "limit_train_batches": 1.0,
    "limit_val_batches": 1.0,
    "limit_test_batches": 1.0,
    "limit_predict_batches": 1.0,
    "val_check_interval": 1.0,
    "enable_checkpointing": True,
    "enable_progress_bar": True,
    # Lightning's None leaves torch.use_deterministic_algorithms alone; raylight's False does not touch it either.
    "deterministic": False,
}


@pytest.mark.parametrize(("name", "resolved"), NONE_MEANS_DEFAULT.items(), ids=list(NONE_MEANS_DEFAULT))
def test_explicit_none_means_lightnings_default(name, resolved):
    spec = TrainerSpec.from_kwargs(**{name: None})
    assert getattr(spec, name) == resolved and type(getattr(spec, name)) is type(resolved)
    assert spec == TrainerSpec()
    assert TrainerSpec.from_json(f'{{"{name}": null}}') == TrainerSpec()


def test_all_nones_together_run_as_the_defaults():
    spec = TrainerSpec.from_kwargs(**dict.fromkeys(NONE_MEANS_DEFAULT), max_epochs=None, gradient_clip_val=None)
    assert spec.to_run_config("/r") == TrainerSpec().to_run_config("/r")


@pytest.mark.parametrize("interval", ["00:00:10:00", timedelta(minutes=10), {"minutes": 10}], ids=["str", "td", "dict"])
def test_time_based_val_check_interval_is_refused_as_unsupported(interval):
    (problem,) = _problems_list(val_check_interval=interval)
    assert problem.startswith("val_check_interval: Lightning's time-based val_check_interval is not supported")
    assert f"(got {interval!r})" in problem and "int >= 1" in problem


def test_real_typos_still_get_the_closest_name():
    assert "'enable_progress_bars' (did you mean 'enable_progress_bar'?)" in _problems(enable_progress_bars=False)
    assert "'num_worker' (did you mean 'num_workers'?)" in _problems(num_worker=2)
    assert "'max_epoch' (did you mean 'max_epochs'?)" in _problems(max_epoch=3)


def test_all_problems_are_reported_together():
    with pytest.raises(SpecError) as info:
        TrainerSpec.from_kwargs(max_epochs=-5, precision="fp8", gpus=2)
    problems = info.value.problems
    assert len(problems) == 3
    assert any(p.startswith("max_epochs:") for p in problems)
    assert any(p.startswith("precision:") for p in problems)
    assert any("'gpus'" in p for p in problems)
    assert isinstance(info.value, ValueError)


def test_spec_error_pickles_with_its_problems():
    err = SpecError(["max_epochs: bad (got -2)", "precision: bad (got 'x')"])
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems
    assert str(copy) == str(err)


def test_direct_construction_error_names_field_and_value():
    with pytest.raises(ValidationError) as info:
        TrainerSpec(max_steps=-2)
    text = str(info.value)
    assert "max_steps" in text and "input_value=-2" in text and "int >= -1" in text


def test_devices_and_num_workers_conflict_names_both():
    message = _problems(devices=2, num_workers=4)
    assert "devices=2" in message and "num_workers=4" in message


def test_accelerator_cpu_with_use_gpu_is_rejected():
    message = _problems(accelerator="cpu", use_gpu=True)
    assert "accelerator='cpu'" in message and "use_gpu=True" in message


def test_accelerator_gpu_with_explicit_use_gpu_false_is_rejected():
    message = _problems(accelerator="gpu", use_gpu=False)
    assert "accelerator='gpu'" in message and "use_gpu=False" in message


def test_check_val_every_n_epoch_none_needs_int_interval():
    message = _problems(check_val_every_n_epoch=None, val_check_interval=0.5)
    assert "check_val_every_n_epoch=None" in message and "val_check_interval=0.5" in message
    spec = TrainerSpec.from_kwargs(check_val_every_n_epoch=None, val_check_interval=100)
    assert spec.val_check_interval == 100


def test_lightning_callbacks_and_loggers_are_rejected_with_a_hint():
    class NotACallback:
        pass

    message = _problems(callbacks=[NotACallback()])
    assert "callbacks:" in message and "NotACallback" in message and "runtime" in message

    class LightningStyleLogger:  # has log_metrics but is not a raylight MetricsSink
        def log_metrics(self, metrics, step):
            pass

    message = _problems(logger=LightningStyleLogger())
    assert "logger:" in message and "LightningStyleLogger" in message and "TensorBoardLogger" in message


# ------------------------------------------------------------------ defaults


def test_defaults_match_lightning():
    spec = TrainerSpec()
    assert spec.max_epochs is None and spec.max_steps == -1
    assert spec.limit_train_batches == 1.0 and isinstance(spec.limit_train_batches, float)
    assert spec.val_check_interval == 1.0 and spec.check_val_every_n_epoch == 1
    assert spec.num_sanity_val_steps == 2 and spec.log_every_n_steps == 50
    assert spec.accumulate_grad_batches == 1 and spec.gradient_clip_val is None
    assert spec.gradient_clip_algorithm is None and spec.precision == "32-true"  # None clips by norm
    assert spec.logger is True and spec.callbacks == []
    assert spec.enable_checkpointing and spec.enable_progress_bar
    assert spec.num_workers == 0 and not spec.use_gpu and spec.run_name is None


# ------------------------------------------------------------------ aliases


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        (32, "32-true"),
        ("32", "32-true"),
        ("32-true", "32-true"),
        (16, "16-mixed"),
        ("16", "16-mixed"),
        ("16-mixed", "16-mixed"),
        ("bf16", "bf16-mixed"),
        ("bf16-mixed", "bf16-mixed"),
        ("bf16-true", "bf16-true"),
        (64, "64-true"),
        ("64", "64-true"),
        ("64-true", "64-true"),
    ],
)
def test_precision_aliases_normalised(given, canonical):
    assert TrainerSpec.from_kwargs(precision=given).precision == canonical


def test_int_and_float_limits_keep_their_type():
    spec = TrainerSpec.from_kwargs(limit_train_batches=1, limit_val_batches=1.0, limit_test_batches=0.25)
    assert spec.limit_train_batches == 1 and type(spec.limit_train_batches) is int
    assert type(spec.limit_val_batches) is float
    assert spec.limit_test_batches == 0.25
    # Lightning reads a whole float above 1 as a batch count.
    assert TrainerSpec.from_kwargs(limit_val_batches=10.0).limit_val_batches == 10
    assert type(TrainerSpec.from_kwargs(val_check_interval=50.0).val_check_interval) is int


def test_accelerator_and_devices_aliases():
    spec = TrainerSpec.from_kwargs(accelerator="gpu", devices=4)
    assert spec.use_gpu is True and spec.num_workers == 4
    assert TrainerSpec.from_kwargs(accelerator="cuda").use_gpu is True
    assert TrainerSpec.from_kwargs(accelerator="cpu", devices=2).use_gpu is False
    assert TrainerSpec.from_kwargs(devices=3, num_workers=3).num_workers == 3
    assert TrainerSpec.from_kwargs(devices="auto", num_workers=2).num_workers == 2
    assert TrainerSpec.from_kwargs(accelerator="auto", use_gpu=True).use_gpu is True


def test_misc_normalisation():
    spec = TrainerSpec.from_kwargs(
        gradient_clip_val=1,
        default_root_dir=Path("/tmp/x"),
        resources_per_worker={"CPU": 2},
        callbacks=Callback(),
        logger=None,
        fast_dev_run=True,
    )
    assert spec.gradient_clip_val == 1.0 and isinstance(spec.gradient_clip_val, float)
    assert spec.default_root_dir == "/tmp/x"
    assert spec.resources_per_worker == {"CPU": 2.0}
    assert len(spec.callbacks) == 1 and isinstance(spec.callbacks[0], Callback)
    assert spec.logger is True
    assert spec.fast_dev_run is True


def test_valid_run_names():
    for name in ["exp-1", "my_run.v2", "A", "0abc"]:
        assert TrainerSpec.from_kwargs(run_name=name).run_name == name


# ------------------------------------------------------------------ frozen / JSON


def test_spec_is_frozen():
    spec = TrainerSpec.from_kwargs(max_epochs=3)
    with pytest.raises(ValidationError):
        spec.max_epochs = 5
    assert spec.max_epochs == 3


def test_json_round_trip_is_equal():
    spec = TrainerSpec.from_kwargs(
        max_epochs=3,
        limit_train_batches=10,
        limit_val_batches=0.5,
        val_check_interval=0.25,
        precision="bf16",
        gradient_clip_val=0.5,
        gradient_clip_algorithm="value",
        accelerator="gpu",
        devices=2,
        resources_per_worker={"CPU": 4, "GPU": 1},
        placement_strategy="SPREAD",
        run_name="exp-1",
        default_root_dir="/tmp/runs",
        fast_dev_run=3,
        logger=False,
        max_failures=-1,
    )
    text = spec.to_json()
    again = TrainerSpec.from_json(text)
    assert again == spec
    assert type(again.limit_train_batches) is int and type(again.limit_val_batches) is float
    assert TrainerSpec.from_json(TrainerSpec().to_json()) == TrainerSpec()


def test_json_leaves_out_callbacks_and_logger_objects(tmp_path):
    spec = TrainerSpec.from_kwargs(
        callbacks=[Callback()], logger=[TensorBoardLogger(), CSVLogger(str(tmp_path))], max_epochs=2
    )
    text = spec.to_json()
    assert '"callbacks"' not in text and '"logger"' not in text
    again = TrainerSpec.from_json(text)
    assert again.callbacks == [] and again.logger is True and again.max_epochs == 2
    assert '"logger": false' in TrainerSpec.from_kwargs(logger=False).to_json()


def test_from_json_rejects_bad_values():
    with pytest.raises(SpecError, match=r"max_steps: .*\(got -7\)"):
        TrainerSpec.from_json('{"max_steps": -7}')


# ------------------------------------------------------------------ RunConfig


def test_to_run_config_maps_every_loop_field():
    spec = TrainerSpec.from_kwargs(
        max_epochs=4,
        min_epochs=1,
        max_steps=100,
        min_steps=10,
        limit_train_batches=20,
        limit_val_batches=0.5,
        limit_test_batches=3,
        limit_predict_batches=0.1,
        val_check_interval=0.5,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=-1,
        log_every_n_steps=5,
        accumulate_grad_batches=4,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="value",
        precision=16,
        deterministic=True,
        detect_anomaly=True,
        enable_checkpointing=False,
        fast_dev_run=True,
        use_distributed_sampler=False,
        fail_on_nonfinite_loss=True,
        accelerator="gpu",
    )
    config = spec.to_run_config("/runs/exp-1")
    assert config == RunConfig(
        max_epochs=4,
        min_epochs=1,
        max_steps=100,
        min_steps=10,
        limit_train_batches=20,
        limit_val_batches=0.5,
        limit_test_batches=3,
        limit_predict_batches=0.1,
        val_check_interval=0.5,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=-1,
        log_every_n_steps=5,
        accumulate_grad_batches=4,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="value",
        precision="16-mixed",
        deterministic=True,
        enable_checkpointing=False,
        fast_dev_run=1,
        use_distributed_sampler=False,
        accelerator="gpu",
        default_root_dir="/runs/exp-1",
        detect_anomaly=True,
        fail_on_nonfinite_loss=True,
    )
    assert type(config.limit_train_batches) is int


def test_to_run_config_defaults_and_fast_dev_run():
    config = TrainerSpec().to_run_config("/runs/x")
    assert config.accelerator == "cpu" and config.fast_dev_run == 0
    assert config.default_root_dir == "/runs/x"
    assert config.effective_max_epochs == 1000
    assert TrainerSpec.from_kwargs(fast_dev_run=5).to_run_config("d").fast_dev_run == 5
    assert TrainerSpec.from_kwargs(use_gpu=True).to_run_config("d").accelerator == "gpu"


def test_new_run_name_format():
    name = new_run_name(datetime(2024, 5, 6, 7, 8, 9))
    assert re.fullmatch(r"run-20240506-070809-[0-9a-f]{4}", name)
    assert TrainerSpec.from_kwargs(run_name=name).run_name == name  # a valid run_name
    assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{4}", new_run_name())


@pytest.mark.parametrize("has_gpu", [True, False])
def test_accelerator_auto_in_the_driver_process_uses_its_gpu_when_it_has_one(monkeypatch, has_gpu):
    # The machine's answer is stubbed: the choice is what is tested here (the GPU runs are tests/runtime's CUDA tests).
    monkeypatch.setattr("torch.cuda.is_available", lambda: has_gpu)
    in_process = TrainerSpec.from_kwargs().to_run_config("/tmp/run")
    assert in_process.accelerator == ("gpu" if has_gpu else "cpu")
    assert TrainerSpec.from_kwargs(accelerator="cpu").to_run_config("/tmp/run").accelerator == "cpu"
    # Ray workers' devices are not the driver's: they use GPUs with use_gpu=True only.
    assert TrainerSpec.from_kwargs(num_workers=2).to_run_config("/tmp/run").accelerator == "cpu"
    assert TrainerSpec.from_kwargs(num_workers=2, use_gpu=True).to_run_config("/tmp/run").accelerator == "gpu"
