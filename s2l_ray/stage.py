"""The contract between stages: a folder per stage, published atomically, with a marker.

    <output_dir>/<stage>/            the published result (only ever appears whole)
        _SUCCESS.json                completion marker: fingerprint, timings, summary
        config.yaml                  the resolved config the stage ran with
        report.json                  the stage's own report (counts, rejects, speed)
        ...                          the stage's data (Parquet, checkpoints, ...)
    <output_dir>/.<stage>.tmp/       work in progress; a crash leaves it, a rerun replaces it

A rerun skips a stage whose marker carries the same fingerprint (the hash of the config sections
the stage reads plus its upstream stages' fingerprints). A different fingerprint means the stored
result came from another config: that fails, naming the fix, unless run.overwrite is set.
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

log = logging.getLogger(__name__)
MARKER = "_SUCCESS.json"


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
        if m is None:
            return False
        if m.get("fingerprint") == self.fingerprint:
            return True
        if self.cfg.run.overwrite:
            log.warning("%s: stored result came from another config; recomputing", self.name)
            return False
        raise ConfigError(
            f"{self.path} holds a '{self.name}' result made with a different config "
            f"(sections {', '.join(self.sections)} or an upstream stage changed). Fix: use a new "
            f"run.output_dir, or pass run.overwrite=true to recompute it")

    def needs_run(self) -> bool:
        """False (and logged) when a current result is published; otherwise joins or starts
        Ray, which every stage's work runs on, and returns True."""
        if self.is_done():
            log.info("%s: already done (%s), skipping", self.name, self.path)
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
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": elapsed}
        (self.tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        (self.tmp / ".fingerprint").unlink(missing_ok=True)
        old = self.root / f".{self.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)  # atomic on one filesystem: the result appears whole
        if old.exists():
            shutil.rmtree(old)
        log.info("%s: published %s", self.name, self.path)
        return self.path

    def report(self) -> dict[str, Any]:
        return json.loads((self.path / "report.json").read_text(encoding="utf-8"))
