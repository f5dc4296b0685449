"""Finished stages kept at `run.storage_uri` (s3://, gs://, file:// or a local path).

Stages always work in the local `run.output_dir` and publish there first; this module mirrors a
published stage folder to `<storage_uri>/<stage>/` and brings it back:

    push(stage)   old remote marker deleted -> remote folder emptied -> data, config.yaml,
                  report.json copied -> _SUCCESS.json copied LAST: a reader that sees the
                  marker sees the whole result (object stores have no atomic folder rename)
    fetch(stage)  remote marker with this fingerprint -> copy into .<stage>.download/ ->
                  check the copied marker -> swap into <output_dir>/<stage>/

Everything goes through pyarrow.fs, so a file:// URI takes the same code path as s3:// and gs://.
Credentials come from the environment (pyarrow's S3/GCS defaults), never from the URI.
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import TYPE_CHECKING, Any

from s2l_ray.errors import S2LError

if TYPE_CHECKING:
    from s2l_ray.stages.base import Stage

log = logging.getLogger(__name__)


def _remote(stage: Stage) -> tuple[Any, str, str]:
    """(filesystem, the stage's remote folder as that filesystem names it, its URI)."""
    from pyarrow import fs as pafs

    uri = str(stage.cfg.run.storage_uri).rstrip("/")
    if "://" in uri:
        filesystem, root = pafs.FileSystem.from_uri(uri)
    else:
        filesystem, root = pafs.LocalFileSystem(), uri
    return filesystem, f"{root.rstrip('/')}/{stage.name}", f"{uri}/{stage.name}"


class StorageError(S2LError):
    """run.storage_uri cannot be read or written."""


def _fail(stage: Stage, action: str, uri: str, e: Exception) -> StorageError:
    return StorageError(
        f"{stage.name}: {action} {uri} failed ({type(e).__name__}: {e}). Fix: check "
        "run.storage_uri and the credentials in the environment; the local result in "
        f"{stage.root} is kept, and a rerun retries the transfer")


def remote_marker(stage: Stage) -> dict[str, Any] | None:
    """The stage's remote _SUCCESS.json, or None when there is none."""
    from pyarrow import fs as pafs

    from s2l_ray.stages.base import MARKER

    filesystem, folder, uri = _remote(stage)
    try:
        if filesystem.get_file_info(f"{folder}/{MARKER}").type == pafs.FileType.NotFound:
            return None
        with filesystem.open_input_stream(f"{folder}/{MARKER}") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise _fail(stage, "reading", f"{uri}/{MARKER}", e) from e


def push(stage: Stage) -> None:
    """Upload the published local folder; the marker goes last."""
    from pyarrow import fs as pafs

    from s2l_ray.stages.base import MARKER

    filesystem, folder, uri = _remote(stage)
    local = pafs.LocalFileSystem()
    try:
        # Retract the old marker first, so nobody pairs it with half-copied new files.
        if filesystem.get_file_info(f"{folder}/{MARKER}").type != pafs.FileType.NotFound:
            filesystem.delete_file(f"{folder}/{MARKER}")
        filesystem.delete_dir_contents(folder, missing_dir_ok=True)
        filesystem.create_dir(folder, recursive=True)
        for entry in sorted(stage.path.iterdir()):
            if entry.name == MARKER:
                continue
            if entry.is_dir():  # copy_files leaves creating the top folder to the caller
                filesystem.create_dir(f"{folder}/{entry.name}", recursive=True)
            pafs.copy_files(str(entry), f"{folder}/{entry.name}", source_filesystem=local,
                            destination_filesystem=filesystem)
        pafs.copy_files(str(stage.path / MARKER), f"{folder}/{MARKER}",
                        source_filesystem=local, destination_filesystem=filesystem)
    except OSError as e:
        raise _fail(stage, "uploading to", uri, e) from e
    log.info("%s: uploaded to %s", stage.name, uri)


def push_if_missing(stage: Stage) -> None:
    """A locally finished stage the storage lacks (storage_uri set later, or an upload that
    failed): upload it now."""
    _, _, uri = _remote(stage)
    remote = remote_marker(stage)
    if remote is not None and stage.matches(remote, uri, "run.storage_uri"):
        return
    push(stage)


def fetch(stage: Stage) -> bool:
    """Download the stage's remote result when it matches this config; True if it did."""
    from pyarrow import fs as pafs

    from s2l_ray.stages.base import MARKER

    remote = remote_marker(stage)
    filesystem, folder, uri = _remote(stage)
    if remote is None or not stage.matches(remote, uri, "run.storage_uri"):
        return False
    part = stage.root / f".{stage.name}.download"
    shutil.rmtree(part, ignore_errors=True)  # a download cut short earlier
    part.mkdir(parents=True)
    try:
        pafs.copy_files(folder, str(part), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        shutil.rmtree(part, ignore_errors=True)
        raise _fail(stage, "downloading", uri, e) from e
    copied = part / MARKER
    if not copied.is_file() or json.loads(copied.read_text()).get("fingerprint") != \
            stage.fingerprint:  # replaced by another writer while we copied
        shutil.rmtree(part, ignore_errors=True)
        log.warning("%s: %s changed during the download; computing it here", stage.name, uri)
        return False
    stage.swap_in(part)
    shutil.rmtree(stage.tmp, ignore_errors=True)  # local work in progress, now superseded
    log.info("%s: downloaded the finished result from %s to %s", stage.name, uri, stage.path)
    return True
