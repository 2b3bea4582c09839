"""The loop settings the runtime receives, already validated by the launcher.

The launcher's pydantic ``TrainerSpec`` owns validation and defaults; it turns
itself into a :class:`RunConfig` so the runtime never depends on pydantic or
on the launcher, and a test can build one by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunConfig:
    max_epochs: int | None = None  # None with max_steps == -1 means 1000, as in Lightning
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
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None  # "norm" (the default when None) or "value"
    precision: str = "32-true"  # 32-true, 16-mixed, bf16-mixed, bf16-true, 64-true
    deterministic: bool | str = False  # True, False or "warn"
    enable_checkpointing: bool = True
    fast_dev_run: int = 0  # 0 = off, N = run N batches of each stage
    use_distributed_sampler: bool = True
    accelerator: str = "cpu"  # "cpu" or "gpu"
    find_unused_parameters: bool = False  # DDP's: parameters a backward does not reach are not waited for
    default_root_dir: str = "."  # the run directory; checkpoints/ lives under it
    detect_anomaly: bool = False
    fail_on_nonfinite_loss: bool = False

    @property
    def effective_max_epochs(self) -> int:
        if self.fast_dev_run:
            return 1
        if self.max_epochs is None:
            return 1000 if self.max_steps == -1 else -1
        return self.max_epochs

    @property
    def effective_max_steps(self) -> int:
        if self.fast_dev_run:
            return self.fast_dev_run
        return self.max_steps
