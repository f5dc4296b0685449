"""Every YAML under cluster_configs/ parses as what it claims to be, and starts with its command.

Pipeline configs load with `load_config` (so a renamed or removed key fails here); Ray autoscaler
configs go through the same offline steps `ray up` runs before it calls the cloud
(`prepare_config`, then `validate_config` against Ray's JSON schema); the KubeRay RayJob is
checked structurally, down to the pipeline config its entrypoint runs. Files are globbed, so a
new file is covered (or fails as unclassified) without editing this test.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from s2l_ray.config import S2LConfig, load_config
from s2l_ray.models.specs import check_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
ALL = sorted([*CONFIGS.rglob("*.yaml"), *CONFIGS.rglob("*.yml")])
IMAGE_HOME = "/home/ray/s2l_ray/"  # WORKDIR of the Dockerfile: where the image keeps the repo


def _kind(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    if path.name.startswith("pipeline"):
        return "pipeline"
    if isinstance(data, dict) and "provider" in data and "available_node_types" in data:
        return "autoscaler"
    if isinstance(data, dict) and data.get("kind") == "RayJob":
        return "rayjob"
    return "unknown"


def _of_kind(kind: str) -> list[Path]:
    return [p for p in ALL if _kind(p) == kind]


def _ids(p: Path) -> str:
    return p.name


def test_every_kind_is_present_and_every_file_classified() -> None:
    kinds = {p.name: _kind(p) for p in ALL}
    assert "unknown" not in kinds.values(), f"add a check for: {kinds}"
    names = set(kinds)
    assert {"aws.yaml", "gcp.yaml", "kuberay_rayjob.yaml", "pipeline_laptop.yaml",
            "pipeline_mathinstruct_1x8gpu.yaml", "pipeline_10m_autoscaling.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=_ids)
def test_starts_with_the_command_that_runs_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    rel = f"cluster_configs/{path.name}"
    assert first.startswith("# "), first
    kind = _kind(path)
    if kind == "pipeline":  # s2l run FILE, or ray job submit ... -- s2l run FILE
        assert re.search(rf"s2l run {re.escape(rel)}\b", first), first
    elif kind == "autoscaler":
        assert f"ray up {rel}" in first, first
    else:
        assert f"kubectl apply -f {rel}" in first, first


@pytest.mark.parametrize("path", ALL, ids=_ids)
def test_files_named_in_comments_exist(path: Path) -> None:
    comments = "\n".join(line for line in path.read_text().splitlines()
                         if line.lstrip().startswith("#"))
    for name in re.findall(r"cluster_configs/([\w.-]+\.ya?ml)", comments):
        assert (CONFIGS / name).is_file(), f"{path.name} mentions missing cluster_configs/{name}"


# ---------------------------------------------------------------------------------------------
# pipeline configs


def _pipeline(name: str) -> S2LConfig:
    return load_config(CONFIGS / name)


@pytest.mark.parametrize("path", _of_kind("pipeline"), ids=_ids)
def test_pipeline_loads_and_its_models_are_valid_specs(path: Path) -> None:
    cfg = load_config(path)
    check_spec(cfg.reference.model, "reference.model")  # tiny presets / hub ids, no network
    check_spec(cfg.target.model, "target.model")
    assert not cfg.reference.trust_remote_code and not cfg.target.trust_remote_code


def test_laptop_pipeline_is_the_local_demo_scale() -> None:
    cfg = _pipeline("pipeline_laptop.yaml")
    assert cfg.run.ray_address is None and cfg.data.source == "demo:mathmix"
    assert cfg.reference.model.startswith("tiny:") and cfg.target.model.startswith("tiny:")
    assert cfg.demo.n_train <= 5000
    # It fits a 2-CPU machine next to Ray Data (what the demo's CPU check asks for).
    assert cfg.reference.num_workers * cfg.reference.cpus_per_worker < 2


def test_mathinstruct_pipeline_uses_one_node_of_8_gpus() -> None:
    cfg = _pipeline("pipeline_mathinstruct_1x8gpu.yaml")
    assert cfg.data.source == "hf:TIGER-Lab/MathInstruct" and cfg.data.format == "mathinstruct"
    assert "pythia-70m" in cfg.reference.model
    for section in (cfg.reference, cfg.target):
        assert section.num_workers == 8 and section.use_gpu is True
    assert cfg.trajectories.use_gpu is True and cfg.trajectories.concurrency == 8
    # The paper's 32 examples per optimizer step, spread over the 8 workers.
    r = cfg.reference
    assert r.batch_size * r.grad_accum * r.num_workers == 32
    assert (r.epochs, r.lr, r.num_checkpoints, cfg.cluster.k) == (3, 2e-5, 10, 100)
    assert cfg.select.budget == 0.11
    # A ~1B-7B target that shares Pythia's tokenizer (ingest tokenizes once for both).
    size = re.search(r"pythia-(\d+(?:\.\d+)?)b", cfg.target.model)
    assert size and 1 <= float(size.group(1)) <= 7
    assert cfg.sweep.max_concurrent_trials * cfg.target.num_workers <= 8


def test_10m_pipeline_joins_an_autoscaling_cluster() -> None:
    cfg = _pipeline("pipeline_10m_autoscaling.yaml")
    assert cfg.run.ray_address == "auto"
    assert (cfg.run.storage_uri or "").startswith(("s3://", "gs://"))
    assert cfg.data.allowed_roots and cfg.data.source.startswith(cfg.data.allowed_roots[0])
    assert cfg.reference.use_gpu and cfg.trajectories.use_gpu and cfg.target.use_gpu
    assert cfg.reference.max_failures != 0 and cfg.target.max_failures != 0  # spot nodes
    # More GPUs than one 8-GPU node: the autoscaler has to add nodes.
    assert cfg.reference.num_workers > 8 and cfg.trajectories.concurrency > 8
    # Output on the shared file system the cluster configs mount on every node.
    assert cfg.run.output_dir.startswith("/mnt/s2l/")


# ---------------------------------------------------------------------------------------------
# Ray autoscaler configs


def _validated(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does offline before it calls the cloud: merge the provider's defaults,
    then validate against ray/autoscaler/ray-schema.json plus Ray's own cross-checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", _of_kind("autoscaler"), ids=_ids)
def test_autoscaler_config_passes_rays_validation(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    config = _validated(raw)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert workers and all(v.get("min_workers", 0) == 0 for v in workers.values())
    assert any(v["resources"].get("GPU", 0) > 0 for v in workers.values()), "GPU workers"
    assert sum(v["max_workers"] for v in workers.values()) <= config["max_workers"]
    # Every node runs the image built from the Dockerfile; nothing installs at start-up.
    assert "s2l_ray" in config["docker"]["image"]
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in config.get(key, [])), key
    # The shared file system that pipeline_10m_autoscaling.yaml writes to is mounted.
    assert any("/mnt/s2l:/mnt/s2l" in o for o in config["docker"]["run_options"])


@pytest.mark.parametrize("path", _of_kind("autoscaler"), ids=_ids)
def test_autoscaler_validation_is_not_vacuous(path: Path) -> None:
    import jsonschema

    raw = yaml.safe_load(path.read_text())
    broken = copy.deepcopy(raw)
    broken["available_node_types"][raw["head_node_type"]]["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        _validated(broken)
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _validated(broken)


# ---------------------------------------------------------------------------------------------
# KubeRay RayJob


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


@pytest.mark.parametrize("path", _of_kind("rayjob"), ids=_ids)
def test_rayjob_runs_s2l_on_an_autoscaling_gpu_cluster(path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["s2l", "run"], argv
    # The config it runs is this repository's (baked into the image) and loads with its
    # overrides.
    assert argv[2].startswith(IMAGE_HOME), argv[2]
    local = ROOT / argv[2][len(IMAGE_HOME):]
    assert local.is_file(), local
    load_config(local, argv[3:])
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    images = {c["image"] for t in [head["template"], *(g["template"] for g in groups)]
              for c in _containers(t)}
    assert len(images) == 1 and "s2l_ray" in images.pop()
    gpu_groups = [g for g in groups if any(
        "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
        for c in _containers(g["template"]))]
    assert gpu_groups, "a GPU worker group"
    for g in groups:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and g["groupName"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())


def test_dockerfile_builds_what_the_configs_run() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\S+-gpu\b", text, re.M)
    assert '".[gpu]"' in text  # the package with its GPU extra
    assert re.search(r'^CMD \["s2l", "--help"\]$', text, re.M)
    assert f"WORKDIR {IMAGE_HOME.rstrip('/')}" in text
    assert re.search(r"^COPY .*cluster_configs", text, re.M)  # what the RayJob runs
    assert "|| true" not in text  # a failed pip install must fail the build
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "s2l_output", ".device-bundle"):
        assert entry in ignored, entry
