"""Bring your own: `reference.checkpoints` (score given checkpoints instead of training) and
`trajectories.source` (ready-made trajectories), on the session's small real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.config import ConfigError
from s2l_ray.models.checkpoints import check_checkpoint_specs, hub_spec, step_of
from s2l_ray.stages.base import read_report
from s2l_ray.stages.given import import_trajectories
from s2l_ray.stages.registry import run_stage, stage_for
from s2l_ray.stages.train_ref import load_manifest
from s2l_ray.stages.trajectories import TrajectoryError
from tests.small_run import perturbed_checkpoint, small_run_cfg


def _traj(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")


def _data(cfg) -> Path:
    return Path(cfg.data.source).parent


def _given_paths(cfg) -> list[str]:
    return [m["path"] for m in load_manifest(stage_for(cfg, "train-ref").path)]


def test_specs_and_steps(tmp_path: Path) -> None:
    assert hub_spec("EleutherAI/pythia-70m@step1000") == ("EleutherAI/pythia-70m", "step1000")
    assert hub_spec("EleutherAI/pythia-70m") is None and hub_spec(str(tmp_path)) is None
    assert step_of("EleutherAI/pythia-70m@step1000", 0) == 1000
    assert step_of("/ckpts/step_0000040", 3) == 40 and step_of("/ckpts/final", 3) == 4
    with pytest.raises(ConfigError, match=r"reference.checkpoints\[0\].*names no revision"):
        check_checkpoint_specs(["EleutherAI/pythia-70m"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"reference.checkpoints\[1\].*no \*.safetensors"):
        check_checkpoint_specs(["EleutherAI/pythia-70m@main", str(pickled)])
    with pytest.raises(ConfigError, match="repeats a checkpoint"):
        small_run_cfg(tmp_path, "tiny:nano", tmp_path, "reference.checkpoints=[a,a]")


@pytest.mark.ray
def test_given_checkpoints_give_the_runs_trajectories(small_run, tmp_path: Path,
                                                      tiny_ref: str) -> None:
    paths = _given_paths(small_run)
    cfg = small_run_cfg(tmp_path / "out", tiny_ref, _data(small_run),
                        f"reference.checkpoints={json.dumps(paths)}")
    stage = run_stage(cfg, "trajectories")
    ours = _traj(stage.path)
    theirs = _traj(stage_for(small_run, "trajectories").path)
    assert ours.num_rows == theirs.num_rows > 200
    assert ours.equals(theirs)  # bitwise: ids, sources, token counts, every loss
    ref = stage_for(cfg, "train-ref")
    manifest = json.loads((ref.path / "manifest.json").read_text())
    assert [m["path"] for m in manifest] == paths and [m["step"] for m in manifest] == [10, 20,
                                                                                          30]
    assert read_report(ref.path)["given_checkpoints"] == paths
    assert not (ref.path / "checkpoints").exists()  # nothing trained, nothing copied
    # and the tokenizer the data was tokenized with is the first checkpoint's
    tokenizer = json.loads((tmp_path / "out" / "ingest" / "report.json").read_text())[
        "tokenizer"]
    assert Path(tokenizer).resolve() == Path(paths[0]).resolve()


@pytest.mark.ray
def test_checkpoint_with_another_tokenizer_is_refused_before_scoring(
        small_run, tmp_path: Path, tiny_ref: str) -> None:
    from s2l_ray.models.tiny import build_tokenizer
    other_tok = tmp_path / "tok"
    build_tokenizer(other_tok, vocab_size=300)
    odd = tmp_path / "odd"
    perturbed_checkpoint(tiny_ref, odd, seed=1, tokenizer=str(other_tok))
    paths = _given_paths(small_run)
    out = tmp_path / "out"
    cfg = small_run_cfg(out, tiny_ref, _data(small_run),
                        f"reference.checkpoints={json.dumps([paths[0], str(odd), paths[2]])}")
    with pytest.raises(TrajectoryError, match=r"odd has another tokenizer than .*Fix:"):
        run_stage(cfg, "trajectories")
    assert not (out / "train_ref").exists() and not (out / ".train_ref.tmp").exists()
    assert not (out / "trajectories").exists() and not (out / ".trajectories.tmp").exists()
    # every checkpoint agrees, but the data was tokenized with another tokenizer
    cfg = small_run_cfg(tmp_path / "out2", tiny_ref, _data(small_run), f"data.tokenizer={tiny_ref}",
                        f"reference.checkpoints={json.dumps([str(odd)])}")
    with pytest.raises(TrajectoryError, match=r"examples were tokenized with .*Fix:"):
        run_stage(cfg, "trajectories")
    assert not (tmp_path / "out2" / ".trajectories.tmp").exists()


@pytest.mark.ray
def test_given_trajectories_select_like_the_run(small_run, tmp_path: Path,
                                                tiny_ref: str) -> None:
    from s2l_ray import api

    theirs = _traj(stage_for(small_run, "trajectories").path)
    order = np.random.default_rng(0).permutation(theirs.num_rows)
    given = theirs.select(["id", "losses"]).take(order)
    given = given.set_column(1, "losses", pa.array(given["losses"].to_pylist(),
                                                   pa.list_(pa.float64())))
    src = tmp_path / "given"
    src.mkdir()
    half = given.num_rows // 2
    pq.write_table(given.slice(0, half), src / "a.parquet")
    pq.write_table(given.slice(half), src / "b.parquet")
    cfg = small_run_cfg(tmp_path / "out", tiny_ref, _data(small_run),
                        f"trajectories.source={src}")
    run = api.run_pipeline(cfg, until="select")
    assert _traj(run.path("trajectories")).equals(theirs)
    ref = run.report("train-ref")  # no reference trained, none scored
    assert ref["trained"] is False and ref["checkpoints"] == []
    assert run.selected_ids == api.open_run(small_run).selected_ids


@pytest.mark.ray
def test_given_trajectories_must_match_the_ingested_ids(small_run, tmp_path: Path) -> None:
    examples = Path(small_run.run.output_dir) / "ingest" / "examples"
    ids = sorted(pq.read_table(examples, columns=["id"])["id"].to_pylist())
    losses = [[1.0, 0.5, 0.25]] * len(ids)

    def attempt(i: list[str], x: list, name: str) -> None:
        f = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"id": i, "losses": x}), f)
        import_trajectories(str(f), examples, tmp_path / name)

    attempt(ids, losses, "ok")
    assert _traj(tmp_path / "ok")["id"].to_pylist() == ids
    with pytest.raises(ConfigError, match=rf"3 of the {len(ids)} ingested ids have no trajectory"
                       rf" \('{ids[0]}', '{ids[1]}', '{ids[2]}'\); 2 ids in it were not "
                       r"ingested \('bogus-1', 'bogus-2'\).*Fix:"):
        attempt([*ids[3:], "bogus-1", "bogus-2"], losses[3:] + [[1.0] * 3] * 2, "mismatch")
    with pytest.raises(ConfigError, match=rf"1 rows differ from T=3 .*'{ids[5]}'"):
        attempt(ids, [*losses[:5], [1.0, 2.0], *losses[6:]], "ragged")
    with pytest.raises(ConfigError, match=rf"NaN or infinite losses \(ids '{ids[1]}'\)"):
        attempt(ids, [*losses[:1], [1.0, float("nan"), 2.0], *losses[2:]], "nan")
    with pytest.raises(ConfigError, match=rf"appear more than once \('{ids[0]}'\)"):
        attempt(ids + ids[:1], losses + losses[:1], "dup")
    f = tmp_path / "nolosses.parquet"
    pq.write_table(pa.table({"id": ids}), f)
    with pytest.raises(ConfigError, match=r"has no column \['losses'\]"):
        import_trajectories(str(f), examples, tmp_path / "x")
