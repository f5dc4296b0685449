"""run.storage_uri: stages upload their published folder (marker last) and a rerun whose local
output is gone downloads it instead of recomputing. A file:// URI goes through pyarrow.fs exactly
as s3:// and gs:// do. Also: a publish cut short between its renames is finished by the rerun."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from s2l_ray.config import ConfigError, load_config
from s2l_ray.stages.base import MARKER, Stage
from s2l_ray.stages.registry import run_stage
from tests.conftest import make_cfg

SMALL = ("demo.n_train=60", "demo.n_test_per_source=1")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize(("uri", "key_text"), [
    ("rel/dir", "neither a URI nor an absolute path"),
    ("http://host/x", "scheme 'http' is not supported"),
    ("s3://", "names no bucket"),
    ("s3://AKIAXX:hunter2@bucket/x", "carries credentials"),
    ("file://relative", "not an absolute file URI"),
])
def test_bad_storage_uri_names_key_and_fix(tmp_path: Path, uri: str, key_text: str) -> None:
    with pytest.raises(ConfigError, match="run.storage_uri") as e:
        load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"run.storage_uri={uri}"])
    assert key_text in str(e.value) and "Fix:" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_storage_uri_forms(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for uri, kept in [("s3://bucket/prefix/", "s3://bucket/prefix"), ("gs://b/p", "gs://b/p"),
                      (f"file://{tmp_path}/remote", f"file://{tmp_path}/remote"),
                      (str(tmp_path / "remote"), str(tmp_path / "remote"))]:
        cfg = load_config(None, [f"run.output_dir={out}", f"run.storage_uri={uri}"])
        assert cfg.run.storage_uri == kept
    for uri in (str(out), str(out / "inside"), f"file://{tmp_path}"):
        with pytest.raises(ConfigError, match="overlaps run.output_dir"):
            load_config(None, [f"run.output_dir={out}", f"run.storage_uri={uri}"])
    with pytest.raises(ConfigError, match=r"run.output_dir.*run.storage_uri"):
        load_config(None, ["run.output_dir=s3://bucket/out"])


@pytest.mark.ray
def test_ingest_uploaded_then_downloaded_not_recomputed(
        tmp_path: Path, ray_local, tiny_ref: str, caplog: pytest.LogCaptureFixture) -> None:
    remote = tmp_path / "remote"
    cfg = make_cfg(tmp_path, tiny_ref, *SMALL, f"run.storage_uri=file://{remote}")
    local = run_stage(cfg, "ingest").path
    published = _files(local)
    assert _files(remote / "ingest") == published  # the whole folder, marker included
    assert json.loads((remote / "ingest" / MARKER).read_text())["fingerprint"] == \
        run_stage(cfg, "ingest").fingerprint

    shutil.rmtree(tmp_path / "out")
    caplog.clear()  # the first run's lines are captured too when s2l_ray already logs at INFO
    with caplog.at_level(logging.INFO, logger="s2l_ray"):
        stage = run_stage(cfg, "ingest")
    assert "downloaded the finished result" in caplog.text
    assert "ingest: starting" not in caplog.text  # nothing recomputed
    assert _files(stage.path) == published  # same bytes: report.json's timing included
    assert not (tmp_path / "out" / ".ingest.download").exists()

    # Another config against the same storage fails before any work, naming the fix ...
    other = make_cfg(tmp_path / "b", tiny_ref, "demo.n_train=61", "demo.n_test_per_source=1",
                     f"run.storage_uri=file://{remote}")
    with pytest.raises(ConfigError, match="run.storage_uri"):
        run_stage(other, "ingest")
    assert not (tmp_path / "b" / "out" / "ingest").exists()

    # ... and a finished local stage the storage lacks is uploaded on the next run.
    shutil.rmtree(remote)
    run_stage(cfg, "ingest")
    assert _files(remote / "ingest") == published


def test_publish_cut_short_is_finished_by_the_rerun(tmp_path: Path) -> None:
    """Killed between publish's two renames: the old result sits in .old, the new whole one
    (marker included) in .tmp and nothing at the stage's path. The rerun moves it into place."""
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}"])
    stage = Stage(cfg, "toy", ("select",))
    for value in ("first", "second"):
        (stage.begin() / "data.txt").write_text(value)
        stage.publish({"value": value})
    os.replace(stage.path, stage.tmp)  # the state the kill left
    stale = tmp_path / "out" / ".toy.old"
    stale.mkdir()
    assert not stage.needs_run()  # done: no Ray started, nothing recomputed
    assert (stage.path / "data.txt").read_text() == "second"
    assert stage.report()["value"] == "second"
    assert not stage.tmp.exists() and not stale.exists()


def test_half_written_tmp_is_redone(tmp_path: Path) -> None:
    """A tmp without a (complete) marker is work in progress: it is not published."""
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}"])
    stage = Stage(cfg, "toy", ("select",))
    (stage.begin() / "data.txt").write_text("half")
    (stage.tmp / MARKER).write_text('{"fingerprint": "')  # cut off mid-write
    assert not stage.is_done()
    stage._finish_interrupted_publish()
    assert not stage.path.exists()
    assert not (stage.begin() / "data.txt").exists()  # begin() starts the work folder afresh
