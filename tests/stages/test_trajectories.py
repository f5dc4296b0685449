"""Trajectories stage on a real local Ray: HF's losses for every checkpoint, every row exactly
once, bitwise the same output with 1 or 2 actors and other part files (groups across part
boundaries), clear checkpoint errors.

The reference checkpoints are built directly (perturbed copies of the tiny model, published as a
train_ref stage) instead of trained: the stage only needs T loadable checkpoints. The stage run
checked here is the session's `small_run` (tests/small_run.py: the demo data plus planted
HTML rows, T such checkpoints, trajectories with 1 actor), shared with the tests that read a run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from s2l_ray.core.tokens import labels_for
from s2l_ray.stages.registry import run_stage, stage_for
from s2l_ray.stages.train_ref import load_manifest
from s2l_ray.stages.trajectories import TrajectoryError, check_checkpoints
from tests.conftest import small_cfg
from tests.small_run import perturbed_checkpoint, small_run_cfg

pytestmark = pytest.mark.ray
T = 3


def _cfg(out: Path, tiny_ref: str, *extra: str):
    """The demo data at 240 examples, T checkpoints, small batches (tests that make their own)."""
    return small_cfg(out, tiny_ref, "demo.n_train=240", f"reference.num_checkpoints={T}",
                     "trajectories.batch_tokens=256", *extra)


def _publish_ref(cfg, tiny_ref: str, tokenizers: dict[int, str] | None = None) -> list[Path]:
    """A published train_ref stage with T checkpoints, as run_train_ref would leave it."""
    stage = stage_for(cfg, "train-ref")
    tmp = stage.begin()
    manifest = []
    for i in range(T):
        rel = f"checkpoints/step_{10 * (i + 1):07d}"
        perturbed_checkpoint(tiny_ref, tmp / rel, seed=i, tokenizer=(tokenizers or {}).get(i))
        manifest.append({"index": i, "step": 10 * (i + 1), "epoch": 0, "train_loss": 1.0,
                         "probe_loss": 1.0, "lr": 1e-3, "attempt_start_step": 0, "path": rel})
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    stage.publish({"checkpoints": manifest})
    return [stage.path / m["path"] for m in manifest]


def _copy_inputs(src_out: Path, dst_out: Path, ref: bool = True) -> None:
    """Reuse a finished ingest (and train_ref) in another output folder: same config, so done."""
    for name in ("ingest", "train_ref") if ref else ("ingest",):
        shutil.copytree(src_out / name, dst_out / name)


def _resplit(examples: Path, sizes: list[int]) -> None:
    """The same rows in the same order, cut into parts of `sizes` rows (the rest in a last
    one): other part files, so groups cross part boundaries at other rows."""
    files = sorted(examples.glob("*.parquet"))
    table = pq.read_table(files)
    for f in files:
        f.unlink()
    start = 0
    for i, n in enumerate([*sizes, table.num_rows - sum(sizes)]):
        pq.write_table(table.slice(start, n), examples / f"part-{i}.parquet")
        start += n


def _table(stage) -> pa.Table:
    files = sorted(stage.path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")


def _like(cfg, out: Path, *extra: str):
    """`cfg` (the small run's config) writing to `out`: copies of its stages there are done."""
    return small_run_cfg(out, cfg.reference.model, Path(cfg.data.source).parent, *extra)


@pytest.fixture(scope="module")
def base(small_run):
    """The session's small run (read-only): its ingest, T checkpoints and a trajectories run
    with 1 actor (its own config: trajectories.batch_tokens=256, concurrency 1)."""
    paths = [Path(m["path"]) for m in load_manifest(stage_for(small_run, "train-ref").path)]
    assert len(paths) == T and small_run.trajectories.concurrency == 1
    return small_run, paths, stage_for(small_run, "trajectories")


def test_losses_equal_hf_one_example_at_a_time(base) -> None:
    from transformers import AutoModelForCausalLM

    cfg, paths, stage = base
    out = _table(stage)
    assert out.schema.field("losses").type == pa.list_(pa.float32(), T)
    assert out.column_names == ["id", "source", "n_response_tokens", "losses"]
    examples = pq.read_table(Path(cfg.run.output_dir) / "ingest" / "examples").sort_by("id")
    assert out["id"].to_pylist() == examples["id"].to_pylist()
    ex = examples.to_pylist()
    assert out["n_response_tokens"].to_pylist() == [
        e["n_tokens"] - e["n_prompt_tokens"] for e in ex]
    losses = np.array(out["losses"].to_pylist(), dtype=np.float32)  # (N, T)
    for t, path in enumerate(paths):
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        with torch.no_grad():
            hf = [float(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor(
                [labels_for(e["input_ids"], e["n_prompt_tokens"])])).loss) for e in ex]
        np.testing.assert_allclose(losses[:, t], hf, rtol=0, atol=2e-5)
    assert not np.allclose(losses[:, 0], losses[:, -1])  # the checkpoints really differ


def test_report_manifest_and_marker(base) -> None:
    cfg, paths, stage = base
    rep = stage.report()
    n = pq.read_metadata
    assert rep["examples"] == sum(n(f).num_rows for f in stage.path.glob("*.parquet"))
    assert rep["checkpoints"] == T and len(rep["seconds_per_checkpoint"]) == T
    assert all(s > 0 for s in rep["seconds_per_checkpoint"])
    assert 0.5 < rep["padding_efficiency"] <= 1 and rep["padded_tokens"] >= rep["tokens"] > 0
    assert rep["examples_per_s"] > 0 and rep["tokens_per_s"] > 0 and rep["device"] == "CPU"
    manifest = json.loads((stage.path / "manifest.json").read_text())
    assert [m["path"] for m in manifest] == [str(p) for p in paths]
    assert [m["column"] for m in manifest] == list(range(T))
    marker = (stage.path / "_SUCCESS.json").read_text()
    run_stage(cfg, "trajectories")  # current: skipped
    assert (stage.path / "_SUCCESS.json").read_text() == marker


@pytest.mark.slow
def test_same_output_whatever_the_parallelism(base, tmp_path: Path, tiny_ref: str) -> None:
    cfg, _, stage = base
    other = tmp_path / "out"
    _copy_inputs(Path(cfg.run.output_dir), other)
    # Groups are ranges of ingest's rows in order: other part files (one of a single row, one
    # empty) hold the same groups, each read from one or several of them.
    _resplit(other / "ingest" / "examples", [37, 1, 0, 50, 23, 61])
    two = run_stage(_like(cfg, other, "trajectories.concurrency=2"), "trajectories")
    a, b = _table(stage), _table(two)
    assert b.num_rows == a.num_rows == stage.report()["examples"]
    assert b["id"].to_pylist() == a["id"].to_pylist()  # every id once, none lost
    assert len(set(b["id"].to_pylist())) == b.num_rows
    assert a.equals(b)  # bitwise: ids, sources, counts and every loss
    # Both actors loaded the checkpoints before any scoring began (wait_for_min_actors_s);
    # which of them scores a group is Ray Data's choice (least busy first).
    assert two.report()["actors"] == two.report()["actors_started"] == 2
    assert 1 <= two.report()["actors_used"] <= 2
    assert two.report()["parts"] == 7 and stage.report()["parts"] < 7
    assert two.report()["slices_read"] > stage.report()["slices_read"] >= stage.report()["groups"]


def test_broken_checkpoint_fails_before_the_pipeline(base, tmp_path: Path, tiny_ref: str) -> None:
    cfg0 = base[0]
    out = tmp_path / "out"
    _copy_inputs(Path(cfg0.run.output_dir), out, ref=False)
    cfg = _like(cfg0, out)
    paths = _publish_ref(cfg, tiny_ref)
    weights = paths[1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated file
    with pytest.raises(TrajectoryError, match=r"step_0000020 does not load.*Fix:"):
        run_stage(cfg, "trajectories")
    assert not (out / ".trajectories.tmp").exists() and not (out / "trajectories").exists()


def test_missing_weights_are_an_error(tmp_path: Path, tiny_ref: str) -> None:
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    perturbed_checkpoint(tiny_ref, ck, seed=1)
    tensors = load_file(str(ck / "model.safetensors"))
    name = next(k for k in tensors if "layers.1." in k)
    del tensors[name]
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrajectoryError, match=r"lacks or mismatches weights.*Fix:"):
        check_checkpoints([str(ck)], None)


def test_mismatched_tokenizers_fail(base, tmp_path: Path, tiny_ref: str) -> None:
    from s2l_ray.models.tiny import build_tokenizer

    other_tok = tmp_path / "tok"
    build_tokenizer(other_tok, vocab_size=300)
    cfg0 = base[0]
    out = tmp_path / "out"
    _copy_inputs(Path(cfg0.run.output_dir), out, ref=False)
    cfg = _like(cfg0, out)
    _publish_ref(cfg, tiny_ref, tokenizers={2: str(other_tok)})
    with pytest.raises(TrajectoryError, match=r"step_0000030 has another tokenizer.*Fix:"):
        run_stage(cfg, "trajectories")
    # every checkpoint agrees, but the data was tokenized with another tokenizer
    ck = tmp_path / "ck"
    perturbed_checkpoint(tiny_ref, ck, seed=0, tokenizer=str(other_tok))
    with pytest.raises(TrajectoryError, match=r"examples were tokenized with .*Fix:"):
        check_checkpoints([str(ck)], tiny_ref)


def test_lost_or_duplicated_examples_fail_loudly(tmp_path: Path) -> None:
    from s2l_ray.stages.trajectories import id_digest, verify_output

    pq.write_table(pa.table({"id": ["a", "b", "c"]}), tmp_path / "part.parquet")
    read = [{"side": "input", **id_digest(["a", "b"])}, {"side": "input", **id_digest(["c"])}]
    ok = [*read, {"side": "output", **id_digest(["c", "a", "b"]), "nonfinite": 0}]
    assert verify_output(ok, 3, tmp_path) == {"rows": 3, "nonfinite_losses": 0}
    lost = [*read, {"side": "output", **id_digest(["a", "b"]), "nonfinite": 0}]
    with pytest.raises(TrajectoryError, match="2 scored"):
        verify_output(lost, 3, tmp_path)
    swapped = [*read, {"side": "output", **id_digest(["a", "b", "b"]), "nonfinite": 0}]
    with pytest.raises(TrajectoryError, match="duplicated and another lost"):
        verify_output(swapped, 3, tmp_path)
    with pytest.raises(TrajectoryError, match="4 valid examples"):
        verify_output(ok, 4, tmp_path)
