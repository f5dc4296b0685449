"""The contract between stages: a folder per stage, published atomically, with a marker.

    <output_dir>/<stage>/            the published result (only ever appears whole)
        _SUCCESS.json                completion marker: fingerprint, timings, summary
        config.yaml                  the resolved config the stage ran with
        report.json                  the stage's own report (counts, rejects, speed)
        ...                          the stage's data (Parquet, checkpoints, ...)
    <output_dir>/.<stage>.tmp/       work in progress; a crash leaves it, a rerun replaces it
    <output_dir>/.<stage>.trash/     what the work folder no longer needs once published
                                     (deleted after the publish; see `trash_of`)

A rerun skips a stage whose marker carries the same fingerprint (the hash of the config sections
the stage reads plus its upstream stages' fingerprints). A different fingerprint means the stored
result came from another config: that fails, naming the fix, unless run.overwrite is set.
With run.storage_uri set, a published stage is also uploaded to <storage_uri>/<stage>/, and a
stage missing here but finished there is downloaded instead of recomputed (`s2l_ray.io.storage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_ray.config import ConfigError, S2LConfig, dump_config
from s2l_ray.io.atomic import write_text_atomic

log = logging.getLogger(__name__)
MARKER = "_SUCCESS.json"


def trash_of(workdir: Path) -> Path:
    """Where a stage moves what it must not publish (in one rename, so a kill cannot leave half
    of it in the work folder); `Stage.publish` deletes it once the result is in place."""
    return workdir.with_suffix(".trash")  # .<stage>.tmp -> .<stage>.trash


@dataclass
class Stage:
    """One stage's folders. Use `begin()` -> work in `tmp` -> `publish(report)`."""

    cfg: S2LConfig
    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()  # fingerprints of what it reads besides its sections
    started: float = field(default=0.0, init=False)

    @property
    def root(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def tmp(self) -> Path:
        return self.root / f".{self.name}.tmp"

    @property
    def trash(self) -> Path:
        return trash_of(self.tmp)

    @property
    def fingerprint(self) -> str:
        blob = "|".join((self.cfg.fingerprint(*self.sections), *self.upstream))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def marker(self) -> dict[str, Any] | None:
        f = self.path / MARKER
        if not f.is_file():
            return None
        return json.loads(f.read_text(encoding="utf-8"))

    def is_done(self) -> bool:
        """True when a matching result is published; raises if a different one is."""
        m = self.marker()
        return m is not None and self.matches(m, str(self.path), "run.output_dir")

    def matches(self, marker: dict[str, Any], where: str, place_key: str) -> bool:
        """The config-changed check, for the local folder and for run.storage_uri alike: True
        when `marker` (found at `where`) came from this config; False when from another one and
        run.overwrite is set (this run replaces it); otherwise raises, naming the fix."""
        if marker.get("fingerprint") == self.fingerprint:
            return True
        if self.cfg.run.overwrite:
            log.warning("%s: %s came from another config; it will be recomputed", self.name,
                        where)
            return False
        raise ConfigError(
            f"{where} holds a '{self.name}' result made with a different config "
            f"({describe_change(self, marker)})",
            fix=f"use a new {place_key}, change the keys back, or pass run.overwrite=true to "
            "recompute and replace it")

    def needs_run(self) -> bool:
        """False (and logged) when a current result is published, or downloaded from
        run.storage_uri; otherwise joins or starts Ray, which every stage's work runs on, and
        returns True."""
        self._finish_interrupted_publish()
        uri = self.cfg.run.storage_uri
        if self.is_done():
            if uri:
                from s2l_ray.io.storage import push_if_missing

                push_if_missing(self)
            log.info("%s: already done (%s), skipping", self.name, self.path)
            return False
        if uri:
            from s2l_ray.io.storage import fetch

            if fetch(self):
                return False
        from s2l_ray.runtime import init_ray

        init_ray(self.cfg.run.ray_address, self.cfg.run.num_cpus)
        return True

    def begin(self, *, keep_tmp: bool = False) -> Path:
        """Start the work folder, or with keep_tmp continue one left by the same config."""
        stamp = self.tmp / ".fingerprint"
        if self.tmp.exists():
            same = stamp.is_file() and stamp.read_text() == self.fingerprint
            if keep_tmp and same:
                log.info("%s: continuing the interrupted run in %s", self.name, self.tmp)
            else:
                shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.fingerprint)
        self.started = time.time()
        log.info("%s: starting (work folder %s)", self.name, self.tmp)
        return self.tmp

    def publish(self, report: dict[str, Any]) -> Path:
        """Write snapshot, report and marker into the work folder, then swap it into place."""
        elapsed = time.time() - self.started if self.started else None
        report = {"stage": self.name, "seconds": elapsed, **report}
        dump_config(self.cfg, self.tmp / "config.yaml")
        (self.tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n",
                                              encoding="utf-8")
        marker = {"stage": self.name, "fingerprint": self.fingerprint,
                  "upstream": list(self.upstream),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": elapsed}
        # written last, and whole: a kill mid-write must not leave half a marker
        write_text_atomic(self.tmp / MARKER, json.dumps(marker, indent=2) + "\n")
        (self.tmp / ".fingerprint").unlink(missing_ok=True)
        self.swap_in(self.tmp)
        shutil.rmtree(self.trash, ignore_errors=True)
        log.info("%s: published %s", self.name, self.path)
        if self.cfg.run.storage_uri:
            from s2l_ray.io.storage import push

            push(self)
        return self.path

    def swap_in(self, src: Path) -> None:
        """Move a complete result folder (marker included) into place, replacing any old one.
        Renames are atomic on one filesystem, so `path` only ever holds a whole result; a kill
        between the two renames is finished by the next run (_finish_interrupted_publish)."""
        old = self.root / f".{self.name}.old"
        if old.exists():
            shutil.rmtree(old)  # left by a run killed in here
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(src, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def _finish_interrupted_publish(self) -> None:
        """The marker is written into tmp after all of the stage's data: a tmp holding this
        config's marker is a finished result whose publish was cut short, so move it into place
        instead of recomputing it."""
        f = self.tmp / MARKER
        if not f.is_file():
            return
        try:
            same = json.loads(f.read_text(encoding="utf-8")).get("fingerprint") == \
                self.fingerprint
        except ValueError:
            same = False
        if same:
            log.info("%s: finishing the publish of %s cut short by the last run", self.name,
                     self.tmp)
            self.swap_in(self.tmp)

    def report(self) -> dict[str, Any]:
        return read_report(self.path)


def read_report(folder: Path) -> dict[str, Any]:
    """A published stage folder's report.json."""
    return json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))


def changed_keys(stage: Stage, max_keys: int = 8) -> list[str]:
    """The keys of the stage's sections whose value differs from its published config.yaml
    snapshot, as 'section.key (old -> new)'; both sides go through the same YAML dump, so only
    real changes show."""
    import yaml

    from s2l_ray.config.schema import short

    snap = stage.path / "config.yaml"
    try:
        old = yaml.safe_load(snap.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    new = yaml.safe_load(dump_config(stage.cfg))
    missing = object()
    changes = []
    for section in stage.sections:
        a, b = old.get(section) or {}, new.get(section) or {}
        if not isinstance(a, dict):
            a = {}
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key, missing), b.get(key, missing)
            if va != vb:
                changes.append(f"{section}.{key} ({'absent' if va is missing else short(va)} "
                               f"-> {'absent' if vb is missing else short(vb)})")
    if len(changes) > max_keys:
        changes = [*changes[:max_keys], f"and {len(changes) - max_keys} more"]
    return changes


def describe_change(stage: Stage, marker: dict[str, Any]) -> str:
    """Why a published result does not match this config: the changed keys, else the
    upstream result it was computed from."""
    keys = changed_keys(stage)
    if keys:
        return "changed: " + ", ".join(keys)
    if marker.get("upstream") is not None and marker["upstream"] != list(stage.upstream):
        return (f"its keys ({', '.join(stage.sections)}) are unchanged, but a stage it reads "
                "(or its tokenizer/model) was recomputed or changed")
    return f"keys of {', '.join(stage.sections)} or an upstream stage changed"
