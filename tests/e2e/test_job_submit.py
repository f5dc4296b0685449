"""The README's `ray job submit` command line, run as written against a real Ray head started
with `ray start --head` on 127.0.0.1 with token authentication: the submitted pipeline joins that
cluster (run.ray_address=auto, resolved through the RAY_ADDRESS that the job server sets) and
writes its outputs; without the token in front the same command is refused. The head runs in
its own processes with its own ports and temp dir, so the session's in-process `ray_local` is
untouched; it is ended by its temp dir (not `ray stop`, which would end every Ray on the
machine).

The job resumes a run whose first stages are done: the session's `upstream` (ingest, train-ref,
trajectories of the small run) copied into its output folder, as after a run stopped there. So
what runs on the joined cluster is what is left: cluster (Ray actors), select, a one-trial sweep
(Ray Tune + Ray Train) and the report; the three reused stages run on a joined cluster in
tests/e2e/test_fault_tolerance.py (trajectories) and here inside the sweep (Ray Train)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from s2l_ray.config import dump_config, load_config
from s2l_ray.core.selection import resolve_budget
from tests.conftest import UPSTREAM, copy_upstream, overrides
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
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs_port": gcs, "env": env,
               "token": str(token)}
    finally:
        kill_processes(processes_of(str(temp)))
        shutil.rmtree(temp, ignore_errors=True)


def readme_submit_command() -> str:
    """The `ray job submit` command of the README's cluster section, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Running on a cluster"):]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S)
                 if "ray job submit" in b)
    return block.replace("\\\n", " ").strip()


# The README's placeholders and what this test puts there: its head's job server, its token
# (never the machine's own ~/.ray, which other Rays use), and a tiny config.
PLACEHOLDERS = ("http://127.0.0.1:8265", "~/.ray/auth_token", "my.yaml")
# Beyond the small run's sizes (tests/conftest.py SMALL_RUN, as `upstream` used them): what is
# tested is the job, not the data.
MY_KEYS = ("cluster.k=5", "select.budget=0.2", "target.max_steps=2", "eval.max_examples=6",
           "eval.max_new_tokens=8", "sweep.methods=[s2l]", "sweep.budgets=[32]",
           "sweep.seeds=[0]")  # a count (the demo run has fractions)


def test_readme_cluster_command_runs_the_pipeline(ray_head: dict[str, Any], tmp_path: Path,
                                                  upstream: Path, tiny_ref: str) -> None:
    out = copy_upstream(upstream, tmp_path / "out")
    reused = {name: (out / name / "_SUCCESS.json").read_text() for name in UPSTREAM}
    my_yaml = tmp_path / "my.yaml"
    dump_config(load_config(None, overrides(out, tiny_ref, *MY_KEYS)), my_yaml)
    command = readme_submit_command()
    assert command.startswith("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token ")
    for p in PLACEHOLDERS:
        assert p in command, f"the README's command lost {p!r}; update this test with it"
    ours = command.replace(PLACEHOLDERS[0], ray_head["dashboard"]).replace(
        PLACEHOLDERS[1], ray_head["token"]).replace(PLACEHOLDERS[2], str(my_yaml))
    # `ray` and `python` as a user's shell finds them (this virtualenv first); no Ray auth
    # variables but the command's own.
    env = {k: v for k, v in clean_env().items() if not k.startswith("RAY_AUTH")}
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))

    # Without the token the job server refuses at once, as the README says.
    bare = ours.split("ray job submit", 1)[1]
    refused = subprocess.run(["bash", "-c", "ray job submit" + bare], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert re.search(r"[Aa]uthentication", refused.stdout + refused.stderr), \
        (refused.stdout + refused.stderr)[-3000:]
    assert not (out / "cluster").exists()

    t0 = time.time()
    try:
        done = subprocess.run(["bash", "-c", ours], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=1200)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"job did not finish in 1200 s:\n{str(e.stdout)[-6000:]}")
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, \
        f"job failed (exit {done.returncode}) after {time.time() - t0:.0f} s:\n{output[-8000:]}"
    # It joined this head ('auto' -> the RAY_ADDRESS the job server set), no Ray of its own.
    assert "joining Ray cluster at auto" in output, output[-4000:]
    # (Ray prints 127.0.0.1 as this machine's address: match the head's GCS port.)
    assert re.search(rf"Connecting to existing Ray cluster at address: [\w.-]+:"
                     rf"{ray_head['gcs_port']}\b", output), output[-4000:]
    assert "starting a local Ray" not in output
    # the finished stages were taken as they were, the rest ran in the job
    assert {name: (out / name / "_SUCCESS.json").read_text() for name in UPSTREAM} == reused
    marker = json.loads((out / "select" / "_SUCCESS.json").read_text())
    assert marker["stage"] == "select"
    lines = (out / "select" / "selected.jsonl").read_text().splitlines()
    ids = pq.read_table(out / "select" / "selected.parquet")["id"].to_pylist()
    valid = json.loads((out / "ingest" / "report.json").read_text())["valid"]
    assert len(lines) == len(set(ids)) == len(ids) == resolve_budget(0.2, valid) > 0
    # `run` is the whole pipeline: the one-trial sweep, then the report
    assert (out / "sweep" / "_SUCCESS.json").is_file()
    assert (out / "report" / "index.html").is_file()
