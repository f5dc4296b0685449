"""What the one-call GPU check needs that a CPU can check: its script parses, its demo config
loads (a typo in a key would otherwise cost a GPU session)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from s2l_ray.config import load_config
from tests.test_gpu import demo_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpu", [True, False])
def test_gpu_demo_config_loads(tmp_path: Path, gpu: bool) -> None:
    cfg = load_config(REPO / "s2l_ray" / "configs" / "demo.yaml", demo_overrides(tmp_path, gpu))
    assert cfg.reference.use_gpu is gpu and cfg.target.use_gpu is gpu
    assert cfg.reference.precision == ("bf16" if gpu else "fp32")
    assert cfg.sweep.methods == ["s2l", "random"]


def test_gpu_check_script_parses() -> None:
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for bench in ("trajectory_throughput.py", "train_throughput.py", "ray_overhead.py"):
        assert f"benchmarks/{bench} --device cuda" in text
