"""`ray job submit` against a real Ray head started with `ray start --head` on 127.0.0.1: the
submitted pipeline joins that cluster (run.ray_address=auto, resolved through the RAY_ADDRESS
that the job server sets) and writes its outputs. The head runs in its own processes with its own
ports and temp dir, so the session's in-process `ray_local` is untouched; it is ended by its temp
dir (not `ray stop`, which would end every Ray on the machine)."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from s2l_ray.core.selection import resolve_budget
from tests.ray_procs import (
    REPO,
    clean_env,
    free_ports,
    kill_processes,
    processes_of,
    ray_cli,
    short_tmpdir,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TINY = ["demo.n_train=160", "demo.n_test_per_source=1", "reference.model=tiny:nano",
        "target.model=tiny:nano", "reference.epochs=1", "reference.num_checkpoints=3",
        "cluster.k=5", "select.budget=0.2"]  # what is tested is the job, not the data size
# The working dir is zipped and uploaded to the cluster: the virtualenv alone is gigabytes.
EXCLUDES = [".venv", ".git", "s2l_output", "*.egg-info", "__pycache__", ".pytest_cache",
            ".ruff_cache", ".device-bundle"]


@pytest.fixture
def ray_head() -> Iterator[dict[str, Any]]:
    """A Ray head with its dashboard (and job server) on 127.0.0.1, every port chosen free."""
    temp = short_tmpdir("s2l_head_")
    # Token auth, with a token of its own: the CLI and the job's driver read it from the env.
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr = free_ports(9)
    cmd = [ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--object-store-memory=500000000",
           "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs_port": gcs, "env": env}
    finally:
        kill_processes(processes_of(str(temp)))
        shutil.rmtree(temp, ignore_errors=True)


def _job_logs(head: dict[str, Any], job_id: str) -> str:
    done = subprocess.run([ray_cli(), "job", "logs", "--address", head["dashboard"], job_id],
                          env=head["env"], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def test_ray_job_submit_runs_the_pipeline_on_the_cluster(ray_head: dict[str, Any],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    job_id = f"s2l-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}}
    # `select`: the demo config up to selection (the sweep after it trains the target model:
    # minutes, and not what this test is about).
    entry = [sys.executable, "-m", "s2l_ray", "select", "demo", *TINY,
             f"run.output_dir={out}", "run.ray_address=auto"]
    cmd = [ray_cli(), "job", "submit", "--address", ray_head["dashboard"],
           "--submission-id", job_id, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--", *entry]
    t0 = time.time()
    try:
        done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"job did not finish in 900 s; its logs:\n{_job_logs(ray_head, job_id)}")
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, \
        f"job failed (exit {done.returncode}) after {time.time() - t0:.0f} s:\n{output[-8000:]}"
    # It joined this head ('auto' -> the RAY_ADDRESS the job server set), no Ray of its own.
    assert "joining Ray cluster at auto" in output, output[-4000:]
    # (Ray prints 127.0.0.1 as this machine's address: match the head's GCS port.)
    assert re.search(rf"Connecting to existing Ray cluster at address: [\w.-]+:"
                     rf"{ray_head['gcs_port']}\b", output), output[-4000:]
    assert "starting a local Ray" not in output
    marker = json.loads((out / "select" / "_SUCCESS.json").read_text())
    assert marker["stage"] == "select"
    lines = (out / "select" / "selected.jsonl").read_text().splitlines()
    ids = pq.read_table(out / "select" / "selected.parquet")["id"].to_pylist()
    valid = json.loads((out / "ingest" / "report.json").read_text())["valid"]
    assert len(lines) == len(set(ids)) == len(ids) == resolve_budget(0.2, valid) > 0
    assert not (out / "sweep").exists()
