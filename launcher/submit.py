"""``raylight submit/logs/stop/fetch``: run a training script as a Ray Job and bring its run directories home.

The submission itself is Ray's Job Submission SDK (what ``ray job submit`` uses):
the working directory and this package travel in the job's ``runtime_env``, and
the logs are Ray's. What Ray does not do is bring files back, so a submitted
job's Trainer links each run directory it creates under
``<Ray log dir>/raylight/<submission id>/`` on the node running the script
(``publish_run_dir``), and the submitter downloads them through the dashboard's
log-file endpoint, the same HTTP address the job went to (``fetch_runs``). Files
land where a local run would have put them: ``<working dir>/runs/<run name>/``.
No shared filesystem, bucket or extra port is needed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import urllib.parse
import uuid
from typing import Any, Callable

SUBMISSION_ENV = "RAYLIGHT_SUBMISSION_ID"
PUBLISH_DIR = "raylight"  # under the Ray log directory of the node that runs the job's script
CHUNK_BYTES = 1 << 20
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0  # how long to retry a submission that a just-started head refuses for want of a job agent


class SubmitError(RuntimeError):
    """A problem to report in one line: no command, no such working directory, a failed download."""


# --- inside the submitted job -------------------------------------------------------------------


def publish_run_dir(run_dir: str, address: str | None) -> str | None:
    """In a job started by ``raylight submit``, make ``run_dir`` downloadable by the submitter.

    Links it as ``<Ray log dir>/raylight/<submission id>/<path relative to the job's working directory>``
    (the dashboard serves files under the log directory, symlinks included). Returns the link, or None
    outside a submitted job.
    """
    submission_id = os.environ.get(SUBMISSION_ENV)
    if not submission_id:
        return None
    from launcher.ray.backend import ensure_ray

    ensure_ray(address)  # the job's driver joins its own cluster (RAY_ADDRESS), as the Ray run would anyway
    import ray

    # The log directory of this node's Ray session; Ray has no public accessor for it.
    log_dir = ray._private.worker._global_node.get_logs_dir_path()
    link = os.path.join(log_dir, PUBLISH_DIR, submission_id, _relative_home(run_dir))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.islink(link):
        os.symlink(os.path.abspath(run_dir), link)
    return link


def _relative_home(run_dir: str) -> str:
    """Where the run belongs relative to the working directory: ``runs/<name>`` usually."""
    run_dir = os.path.abspath(run_dir)
    rel = os.path.relpath(run_dir, os.getcwd())
    if rel.startswith(os.pardir):  # an absolute default_root_dir outside the working directory
        rel = os.path.join(os.path.basename(os.path.dirname(run_dir)), os.path.basename(run_dir))
    return rel


# --- on the submitter's machine ---------------------------------------------------------------


ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # in the order Ray's Job SDK reads them


def resolve_address(address: str | None) -> str | None:
    """The address for the jobs commands: ``address`` (``--address``), else the first of ``ADDRESS_VARIABLES``
    that is set, else None (Ray looks for a cluster running on this machine).

    Best is the dashboard's ``http://HEAD:8265``. A ``host:port`` is a cluster (GCS) address, which Ray's SDK
    also takes (it asks the cluster for its dashboard), so it is passed on as it is.
    """
    if address:
        return address
    return next((os.environ[n] for n in ADDRESS_VARIABLES if os.environ.get(n)), None)


def parse_env(items: list[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` items as a dict; the value may contain '=' (``A=b=c`` sets A to ``b=c``)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {shlex.quote(item)}: expected KEY=VALUE, e.g. --env OMP_NUM_THREADS=4")
        env[key] = value
    return env


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    if not address:
        return JobSubmissionClient(None)
    # The SDK prefers $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, to its argument: a GCS address left in
    # RAY_ADDRESS would win over --address. Naming the address in the first variable makes it win.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    finally:
        if saved is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def explain(err: BaseException, address: str | None, job_id: str | None = None) -> str:
    """One line for a person from what the Job Submission SDK raised."""
    text = str(err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    if "RAY_AUTH_TOKEN_PATH is set but" in text:
        return (
            f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')} cannot be read or is empty: point it at "
            "the cluster's token file"
        )
    if "Authentication required" in text or "couldn't find an authentication token" in text:
        return (
            f"the Ray cluster at {address} requires a token and none was sent: set RAY_AUTH_MODE=token and put "
            "the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN)"
        )
    if "Authentication failed" in text:
        return f"the Ray cluster at {address} refused the token: use that cluster's token (~/.ray/auth_token)"
    if isinstance(err, ConnectionError) and address is None:
        return (
            "no Ray dashboard address was given and no Ray cluster is running on this machine: pass "
            "--address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS=http://HEAD:8265"
        )
    if isinstance(err, ConnectionError):
        return (
            f"cannot reach the Ray dashboard at {address}: check that the head node is running and that the "
            "address is its dashboard, e.g. http://HEAD:8265"
        )
    if job_id is not None and "does not exist" in text:
        return f"no job {job_id!r} on the cluster at {address} (`ray job list --address {address}` lists them)"
    return first


def submit(
    address: str | None,
    entrypoint: list[str],
    working_dir: str,
    *,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> tuple[Any, str]:
    """Submit ``entrypoint`` as a Ray Job with ``working_dir`` and this package; returns (client, job id)."""
    import launcher
    import runtime

    if not entrypoint:
        raise SubmitError("nothing to run: give the command after --, e.g. raylight submit -- python train.py")
    working_dir = os.path.abspath(working_dir)
    if not os.path.isdir(working_dir):
        raise SubmitError(f"--working-dir {working_dir} is not a directory: give the directory holding the script")
    jobs = client(address)
    submission_id = submission_id or f"raylight-{uuid.uuid4().hex[:12]}"
    runtime_env = {
        "working_dir": working_dir,
        # Run directories of earlier local runs stay home; the cluster may not have this package installed.
        "excludes": ["runs/", ".git/"],
        "py_modules": [os.path.dirname(runtime.__file__), os.path.dirname(launcher.__file__)],
        "env_vars": {**(env or {}), SUBMISSION_ENV: submission_id},
    }
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(
                entrypoint=shlex.join(entrypoint), runtime_env=runtime_env, submission_id=submission_id
            )
            return jobs, job_id
        except RuntimeError as err:
            # A head that has just started serves the dashboard before its job agent has registered.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def follow(jobs, job_id: str, write: Callable[[str], Any] = sys.stdout.write) -> str:
    """Print the job's logs as they come until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    return wait(jobs, job_id)


def wait(jobs, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once terminal (the log stream may close a moment before the status settles)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = jobs.get_job_status(job_id).value
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def fetch_runs(jobs, job_id: str, dest_root: str) -> list[str]:
    """Download the run directories a submitted job published into ``dest_root``; returns the local run paths.

    Files are written next to their final name and renamed into place, so an interrupted download never
    leaves a truncated checkpoint under the real name.
    """
    info = jobs.get_job_info(job_id)
    node_id = info.driver_node_id
    if not node_id:
        return []
    prefix = f"{PUBLISH_DIR}/{job_id}/"
    runs: list[str] = []
    for name in _list_files(jobs, node_id, prefix):
        local = os.path.join(dest_root, name[len(prefix):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        _download(jobs, node_id, name, local)
        if os.path.basename(local) == "spec.json":
            runs.append(os.path.dirname(local))
    for run in runs:
        _relocate_status(run)
    return sorted(runs)


def _relocate_status(run: str) -> None:
    """Point status.json's checkpoint paths at the downloaded files instead of the cluster node's."""
    from launcher.run_dir import RunDir

    status = RunDir(run).read_status()
    marker = f"/{os.path.basename(run)}/"
    moved = {
        key: os.path.join(run, value.split(marker, 1)[1])
        for key, value in status.items()
        if isinstance(value, str) and marker in value
    }
    if moved:
        RunDir(run).write_status(**{**status, **moved})


def _list_files(jobs, node_id: str, prefix: str) -> list[str]:
    """Every file under ``prefix`` of the node's log directory, descending into (linked) directories."""
    found: list[str] = []
    pending = [prefix]
    while pending:
        directory = pending.pop()
        query = urllib.parse.urlencode({"node_id": node_id, "glob": f"{directory}*"})
        response = jobs._do_request("GET", f"/api/v0/logs?{query}")  # the SDK's request: address, token, cookies
        if response.status_code != 200:
            raise SubmitError(f"listing the job's run files failed: HTTP {response.status_code} {response.text[:200]}")
        for names in response.json()["data"]["result"].values():
            for name in names:
                (pending if name.endswith("/") else found).append(name)
    return sorted(found)


def _download(jobs, node_id: str, name: str, local: str) -> None:
    query = urllib.parse.urlencode({"node_id": node_id, "filename": name, "lines": -1})
    response = jobs._do_request("GET", f"/api/v0/logs/file?{query}", stream=True)
    if response.status_code != 200:
        raise SubmitError(f"downloading {name} failed: HTTP {response.status_code} {response.text[:200]}")
    tmp = f"{local}.part-{os.getpid()}"
    with response, open(tmp, "wb") as out:
        for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
            out.write(chunk)
    os.replace(tmp, local)
