"""The driver of a 2-worker Ray run SIGKILLed mid-run; `raylight resume <run dir>` finishes it on the same cluster."""

from __future__ import annotations

import os

import pytest

from tests.launcher.test_resume_cli import check_driver_kill_and_resume

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(900)
def test_driver_killed_mid_ray_run_is_finished_by_raylight_resume(ray_cluster, tmp_path):
    env = dict(
        os.environ, RAYLIGHT_KEY_FILE=str(tmp_path / "key" / "job.key"), PYTHONUNBUFFERED="1", PYTHONPATH=os.getcwd()
    )
    # Same assertions as the in-process test: resumed from the step-4 checkpoint, identical weights to an
    # uninterrupted 2-worker run, every step logged once in the driver's metrics.csv.
    check_driver_kill_and_resume(tmp_path, env, delay=0.4, ray_args=("2", ray_cluster))
