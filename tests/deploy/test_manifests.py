"""deploy/: the files a user builds, applies and launches, checked without Docker, Kubernetes or AWS.

Every YAML parses; the KubeRay manifests validate against a checked-in subset of the ray.io/v1 CRD
schema (kuberay_crd_subset.json); the cluster-launcher file passes the validation `ray up` runs first;
and the files agree on what a user relies on: image tags, the token Secret, token authentication on
every Ray process, GPU requests, and the entrypoint's Trainer options.
"""

from __future__ import annotations

import base64
import binascii
import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml")
SCHEMA = json.loads(Path(__file__).with_name("kuberay_crd_subset.json").read_text())
IMAGE_HOME = "/home/ray/raylight"  # the Dockerfile's WORKDIR: where the image keeps the repository's files


def _load(path: Path) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def _manifest(name: str) -> dict[str, Any]:
    return _load(KUBERAY / name)


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _ray_containers(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for the head and every worker group; KubeRay runs Ray in containers[0]."""
    spec = _cluster_spec(manifest)
    yield "headGroupSpec", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in spec.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{group['groupName']}]", group["template"]["spec"]["containers"][0]


def _gpus(container: dict[str, Any]) -> float:
    return float(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


# ------------------------------------------------------------------ reading the Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, comment lines dropped and continuation lines joined as Docker reads them."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    instructions, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + "\n"
            continue
        full, pending = (pending + line).strip(), ""
        if full:
            keyword, _, rest = full.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _dockerfile_args() -> dict[str, str]:
    """Build arguments with their defaults (the first declaration that has one)."""
    args: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
    return args


def _base_image() -> dict[str, str]:
    """The default RAY_IMAGE, split: rayproject/ray:<ray>-<python>-<variant>."""
    default = _dockerfile_args()["RAY_IMAGE"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<python>py\d+)-(?P<variant>cpu|gpu)", default)
    assert match, f"RAY_IMAGE default {default!r} is not rayproject/ray:<version>-py<NN>-<cpu|gpu>"
    return match.groupdict()


def _raylight_version() -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "no version in pyproject.toml"
    return match.group(1)


def _image_tag(variant: str) -> str:
    """raylight:<raylight version>-ray<Ray image tag>: the scheme in the Dockerfile's header."""
    base = _base_image()
    return f"raylight:{_raylight_version()}-ray{base['ray']}-{base['python']}-{variant}"


def _check_image(image: str, variant: str, where: str) -> str:
    """Asserts that ``image`` is <registry>/<the tag for variant>; returns the registry."""
    registry, _, name = image.rpartition("/")
    assert name == _image_tag(variant), f"{where}: image {image!r} should end in {_image_tag(variant)!r}"
    return registry


def _train_digits():
    spec = importlib.util.spec_from_file_location("deploy_train_digits", DEPLOY / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ every YAML


def test_every_yaml_under_deploy_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 4, f"expected the KubeRay and cluster-launcher files under {DEPLOY}, found {files}"
    for path in files:
        with open(path) as f:
            documents = [doc for doc in yaml.safe_load_all(f) if doc is not None]
        where = path.relative_to(ROOT)
        assert documents, f"{where} holds no YAML document"
        for doc in documents:
            assert isinstance(doc, dict), f"{where}: a document is a {type(doc).__name__}, not a mapping"


# ------------------------------------------------------------------ KubeRay: the CRD schema


def _schema_errors(document: dict[str, Any]) -> list[jsonschema.ValidationError]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))


def _describe(errors: list[jsonschema.ValidationError]) -> str:
    return "\n".join(f"  {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_crd_subset_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_matches_the_crd_subset(name):
    errors = _schema_errors(_manifest(name))
    assert not errors, f"deploy/kuberay/{name} does not match kuberay_crd_subset.json:\n{_describe(errors)}"


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _worker_group(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["workerGroupSpecs"][0]


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return _worker_group(doc)["template"]["spec"]["containers"][0]


# Mistakes that `kubectl apply` refuses under the CRD's schema: (how to make it, what the error must name).
MISTAKES = {
    "misspelt workerGroupSpecs": (
        lambda d: _rename(d["spec"], "workerGroupSpecs", "workerGroupSpec"),
        "'workerGroupSpec' was unexpected",
    ),
    "misspelt rayStartParams": (
        lambda d: _rename(d["spec"]["headGroupSpec"], "rayStartParams", "rayStartParam"),
        "'rayStartParam' was unexpected",
    ),
    "misspelt container resources": (lambda d: _rename(_worker(d), "resources", "resource"), "'resource' was"),
    "number in rayStartParams": (lambda d: _worker_group(d)["rayStartParams"].update({"num-gpus": 1}), "num-gpus"),
    "replicas as a string": (lambda d: _worker_group(d).update(replicas="2"), "replicas"),
    "env value not a string": (lambda d: _worker(d)["env"].append({"name": "OMP_NUM_THREADS", "value": 4}), "value"),
    "memory in GB": (lambda d: _worker(d)["resources"]["limits"].update(memory="16GB"), "memory"),
    "RayJob field in a RayCluster": (lambda d: d["spec"].update(entrypoint="python train.py"), "entrypoint"),
    "unknown auth mode": (lambda d: d["spec"].update(authOptions={"mode": "password"}), "mode"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_crd_subset_rejects_a_broken_manifest(mistake):
    document = _manifest("raycluster.yaml")
    assert not _schema_errors(document), "the unbroken manifest must pass, or this test proves nothing"
    make_mistake, culprit = MISTAKES[mistake]
    broken = copy.deepcopy(document)
    make_mistake(broken)
    errors = _schema_errors(broken)
    assert errors, f"{mistake}: the schema accepted it"
    naming = [e for e in errors if culprit in e.message or culprit in map(str, e.absolute_path)]
    assert naming, f"{mistake}: no error names {culprit!r}:\n{_describe(errors)}"


# ------------------------------------------------------------------ KubeRay: facts across files


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_images_follow_the_dockerfile_tag_scheme(name):
    manifest = _manifest(name)
    registries = {
        _check_image(container["image"], "gpu" if _gpus(container) else "cpu", f"{name} {where}")
        for where, container in _ray_containers(manifest)
    }
    assert len(registries) == 1, f"{name}: head and workers pull from different registries: {registries}"
    ray = _base_image()["ray"]
    assert _cluster_spec(manifest)["rayVersion"] == ray, f"{name}: rayVersion must be the image's Ray, {ray}"


def test_dockerfile_header_builds_the_tags_the_manifests_use():
    header = (DEPLOY / "Dockerfile").read_text()
    base = _base_image()
    for variant in ("cpu", "gpu"):
        assert f"/{_image_tag(variant)} " in header, f"the Dockerfile's build commands should tag {_image_tag(variant)}"
    assert f"RAY_IMAGE=rayproject/ray:{base['ray']}-{base['python']}-gpu" in header


def _secret_example() -> tuple[str, str]:
    """(name, data key) of the Secret in secret.example.yaml."""
    secret = _load(KUBERAY / "secret.example.yaml")
    assert (secret["apiVersion"], secret["kind"]) == ("v1", "Secret")
    (key,) = secret["data"]
    return secret["metadata"]["name"], key


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_ray_container_reads_the_token_from_the_example_secret(name):
    secret_name, secret_key = _secret_example()
    manifest = _manifest(name)
    for where, container in _ray_containers(manifest):
        env = {entry["name"]: entry for entry in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name} {where}: RAY_AUTH_MODE must be token"
        token = env.get("RAY_AUTH_TOKEN", {})
        assert "value" not in token, f"{name} {where}: a literal token in a manifest"
        ref = token.get("valueFrom", {}).get("secretKeyRef")
        assert ref == {"name": secret_name, "key": secret_key}, (
            f"{name} {where}: RAY_AUTH_TOKEN must come from Secret {secret_name!r}, key {secret_key!r}; got {ref}"
        )
    auth = _cluster_spec(manifest).get("authOptions")
    if manifest["kind"] == "RayJob":
        # The operator follows the job through the dashboard, so it needs the token too: only authOptions gives it.
        assert auth == {"mode": "token", "secretName": secret_name}, f"{name}: authOptions must name {secret_name!r}"
    elif auth is not None:
        assert auth.get("secretName") == secret_name, f"{name}: authOptions names another Secret"


def test_secret_example_shows_the_same_secret_and_cannot_be_applied_unedited():
    secret_name, secret_key = _secret_example()
    text = (KUBERAY / "secret.example.yaml").read_text()
    assert f"kubectl create secret generic {secret_name} --from-literal={secret_key}=" in text
    placeholder = _load(KUBERAY / "secret.example.yaml")["data"][secret_key]
    assert "REPLACE" in placeholder
    with pytest.raises(binascii.Error):
        base64.b64decode(placeholder, validate=True)  # so Kubernetes refuses the file as it stands


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_worker_groups_request_gpus_within_their_bounds(name):
    groups = _cluster_spec(_manifest(name))["workerGroupSpecs"]
    assert groups, f"{name}: no worker group"
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert _gpus(container) >= 1, f"{name} group {group['groupName']!r}: no nvidia.com/gpu limit"
        requested = container["resources"].get("requests", {}).get("nvidia.com/gpu")
        if requested is not None:  # Kubernetes requires an extended resource's request to equal its limit
            assert float(requested) == _gpus(container), f"{name} group {group['groupName']!r}"
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_mount_no_volumes(name):
    # The run directory on the head is filled through Ray, never through a shared filesystem.
    spec = _cluster_spec(_manifest(name))
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    assert not any(pod.get("volumes") for pod in pods), f"{name} declares volumes"
    assert not any(container.get("volumeMounts") for _, container in _ray_containers(_manifest(name)))


def test_rayjob_runs_a_script_the_image_holds_with_trainer_options_the_spec_accepts():
    from launcher.spec import TrainerSpec

    job = _manifest("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    python, script, *argv = shlex.split(job["entrypoint"])
    assert python == "python" and script.startswith(IMAGE_HOME + "/"), job["entrypoint"]
    relative = script[len(IMAGE_HOME) + 1 :]
    assert (ROOT / relative).is_file(), f"the entrypoint runs {relative}, which is not in the repository"
    instructions = _dockerfile_instructions()
    assert ("WORKDIR", IMAGE_HOME) in instructions
    copied = [part for keyword, rest in instructions if keyword == "COPY" for part in rest.split()[:-1]]
    assert relative in copied or relative.split("/")[0] + "/" in copied, f"the image does not hold {relative}"

    module = _train_digits()
    spec = TrainerSpec.from_kwargs(**module.trainer_kwargs(module.build_parser().parse_args(argv)))
    assert (spec.num_workers, spec.address, spec.use_gpu) == (2, "auto", True)
    assert spec.max_failures >= 1, "spot workers need restarts: a reclaim without a Ray drain is a failure"
    assert os.path.isabs(spec.default_root_dir), "the run directory should be an absolute path on the head"
    workers = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(group["replicas"] * _gpus(group["template"]["spec"]["containers"][0]) for group in workers)
    assert gpus >= spec.num_workers, f"{spec.num_workers} GPU workers on a cluster with {gpus:g} GPUs"


def test_rayjob_publishes_its_run_directory_under_its_job_id_for_raylight_fetch():
    from launcher.submit import SUBMISSION_ENV

    job = _manifest("rayjob.yaml")["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env[SUBMISSION_ENV] == job["jobId"], "raylight fetch <jobId> finds the run only under the same id"
    assert f"raylight fetch {job['jobId']}" in (DEPLOY / "kuberay" / "rayjob.yaml").read_text()


# ------------------------------------------------------------------ cluster launcher


def _launcher_config() -> dict[str, Any]:
    return _load(DEPLOY / "cluster-launcher" / "aws-spot.yaml")


def test_cluster_launcher_config_passes_rays_own_validation(monkeypatch):
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.chdir(ROOT)  # file_mounts name paths relative to the repository root, where `ray up` runs
    validate_config(prepare_config(_launcher_config()))  # what `ray up` runs before it creates anything


def test_cluster_launcher_has_an_on_demand_head_and_spot_gpu_workers():
    config = _launcher_config()
    assert config["cluster_name"] and config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    for name, node_type in types.items():
        assert isinstance(node_type.get("resources"), dict), f"node type {name!r} has no resources"
        assert node_type.get("node_config", {}).get("InstanceType"), f"node type {name!r} has no node_config"
    head = config["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not one of {sorted(types)}"
    # The head holds the driver and the run directory: not reclaimable, and not a GPU worker.
    assert "InstanceMarketOptions" not in types[head]["node_config"], "the head must not be a spot instance"
    assert not types[head].get("min_workers") and not types[head]["resources"].get("GPU")

    workers = {name: t for name, t in types.items() if name != head}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type offers a GPU"
    registry = _check_image(config["docker"]["image"], "cpu", "docker.image")
    for name, node_type in gpu_types.items():
        assert node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name
        assert node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        assert _check_image(node_type["docker"]["worker_image"], "gpu", f"node type {name}") == registry
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]

    # raylight waits for the workers' nodes (resource_wait_s) without asking the autoscaler for them, so
    # min_workers must keep up the GPUs the entrypoint asks for.
    needed = _train_digits().build_parser().parse_args([]).num_workers
    kept_up = sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    assert kept_up >= needed, f"min_workers keeps {kept_up} GPUs up; train_digits.py needs {needed}"


def test_cluster_launcher_authenticates_every_node_and_installs_the_checkout():
    config = _launcher_config()
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    mounts = config["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", "every node needs the launching user's token"
    for remote, local in mounts.items():
        if local.startswith("~"):
            continue
        assert (ROOT / local).exists(), f"file_mounts copies {local}, which is not in the repository"
        assert remote == f"{IMAGE_HOME}/{Path(local).as_posix()}", f"{local} should land at its place in the image"
    assert f"pip install --no-cache-dir --no-deps {IMAGE_HOME}" in config["setup_commands"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=disabled" not in command


# ------------------------------------------------------------------ the image


def test_dockerfile_turns_token_auth_on_and_bakes_in_no_secret():
    instructions = _dockerfile_instructions()
    assert ("ENV", "RAY_AUTH_MODE=token") in instructions
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG"):
            name = rest.split("=")[0]
            assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", name), f"{keyword} {rest}: no secrets in an image"
        if keyword == "COPY":
            for source in [part for part in rest.split() if not part.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not re.search(r"auth_token|\.ray|job\.key|runs", source), f"COPY {source} could carry a secret"


def test_dockerfile_torch_version_is_the_one_the_readme_pins():
    pins = set(re.findall(r"torch==([\w.+]+)", (ROOT / "README.md").read_text()))
    if not pins:
        pytest.skip("the README pins no torch version")
    version = _dockerfile_args()["TORCH_VERSION"]
    assert version in pins, f"the README pins torch {sorted(pins)}; deploy/Dockerfile installs {version}"


def _install_step() -> str:
    (script,) = [rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN" and "pip install" in rest]
    return script


def _run_install_step(tmp_path: Path, build_args: dict[str, str], shell: str = "sh") -> subprocess.CompletedProcess:
    """The Dockerfile's install step, with stand-ins for pip (records its arguments) and python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path / "pip.log"}"\n')
    (bin_dir / "python").write_text('#!/bin/sh\ncase "$*" in *ray.__version__*) echo 2.60.0 ;; esac\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**_dockerfile_args(), **build_args, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run([shell, "-c", _install_step()], env=env, cwd=tmp_path, capture_output=True, text=True)


CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CU126_INDEX = "https://download.pytorch.org/whl/cu126"
GPU_IMAGE = "rayproject/ray:2.60.0-py311-gpu"


@pytest.mark.parametrize(
    "build_args, torch_index",
    [
        ({}, CPU_INDEX),
        ({"RAY_IMAGE": GPU_IMAGE}, None),  # PyPI's Linux torch wheel is the CUDA build
        ({"RAY_IMAGE": "rayproject/ray:2.60.0-py311-cu128"}, None),
        ({"RAY_IMAGE": GPU_IMAGE, "TORCH_VARIANT": "cpu"}, CPU_INDEX),
        ({"RAY_IMAGE": GPU_IMAGE, "TORCH_INDEX_URL": CU126_INDEX}, CU126_INDEX),
    ],
)
@pytest.mark.parametrize("shell", ["sh", "bash"])  # Docker's default RUN shell, and the SHELL of Ray's images
def test_dockerfile_installs_the_torch_build_of_each_variant(tmp_path, build_args, torch_index, shell):
    result = _run_install_step(tmp_path, build_args, shell)
    assert result.returncode == 0, result.stderr
    torch_line, package_line = (tmp_path / "pip.log").read_text().splitlines()
    version = _dockerfile_args()["TORCH_VERSION"]
    index = f"--index-url {torch_index} " if torch_index else ""
    assert torch_line == f"install --no-cache-dir {index}torch=={version}"
    assert package_line == "install --no-cache-dir .[examples] ray[train]==2.60.0"  # Ray pinned to the image's


def test_dockerfile_refuses_an_unknown_torch_variant(tmp_path):
    result = _run_install_step(tmp_path, {"TORCH_VARIANT": "rocm"})
    assert result.returncode == 2 and "TORCH_VARIANT must be auto, cpu or cuda, got 'rocm'" in result.stderr
    assert not (tmp_path / "pip.log").exists(), "nothing may be installed after a bad build argument"


# ------------------------------------------------------------------ the guide


def test_deploy_readme_names_real_files_options_and_commands():
    from launcher.cli import build_parser
    from launcher.spec import TrainerSpec

    text = (DEPLOY / "README.md").read_text()
    for path in set(re.findall(r"deploy/[\w./-]+\w", text)):
        assert (ROOT / path).exists(), f"deploy/README.md names {path}, which does not exist"
    for call in re.findall(r"Trainer\(([^)]*)\)", text):
        for option in re.findall(r"(\w+)=", call):
            assert option in TrainerSpec.model_fields, f"deploy/README.md passes Trainer({option}=...), not an option"

    blocks = re.findall(r"```.*?```", text, flags=re.S)
    code = blocks + re.findall(r"`[^`\n]+`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = build_parser()._subparsers._group_actions[0].choices
    used = [found for snippet in code for found in re.findall(r"(?<![<\w/.-])raylight (\w+)([^\n`]*)", snippet)]
    assert {command for command, _ in used} >= {"ls", "resume", "submit", "fetch"}, "the guide's raylight commands"
    for command, options in used:
        assert command in commands, f"deploy/README.md runs `raylight {command}`, which is not a command"
        for option in re.findall(r"(--[\w-]+)", options.split(" -- ")[0]):  # after " -- " is the job's command
            assert option in commands[command]._option_string_actions, f"`raylight {command} {option}` does not exist"
    (sentence,) = [part for part in text.split(". ") if "may change on the way" in part]
    for option in re.findall(r"`(--[\w-]+)`", sentence):
        assert option in commands["resume"]._option_string_actions, f"`raylight resume {option}` does not exist"
