"""Parity tests: the same module code under PyTorch Lightning (the oracle) and raylight.

Helpers live in ``tests/parity/harness.py`` (running both sides, comparing
weights/metrics) and ``tests/parity/bodies.py`` (module bodies shared by
several test files). Lightning's own advice-level warnings are silenced here
so that a failing test's output shows the comparison, not the oracle's chatter.
"""

from __future__ import annotations

import logging

import pytest


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "ignore:You defined a `validation_step` but have no `val_dataloader`:UserWarning",
        "ignore:.*does not have many workers:UserWarning",
        "ignore:.*LeafSpec.*is deprecated:DeprecationWarning",
        "ignore:.*LeafSpec.*is deprecated:FutureWarning",
        "ignore:The number of training batches .* is smaller than the logging interval:UserWarning",
    ):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(autouse=True)
def _quiet_lightning_info_logs():
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)
