"""The thin CLI: --help teaches the stages, strict overrides, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s2l_ray.cli import _scoped, main
from s2l_ray.stages.registry import STAGES


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "s2l_ray", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for s in STAGES:
        assert s.name in out
    assert "s2l demo" in out and "ray job submit" in out


def test_config_prints_resolved_and_reference(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "demo", "select.budget=123"]) == 0
    assert "budget: 123" in capsys.readouterr().out
    assert main(["config", "--reference"]) == 0
    assert "`reference.zero_stage`" in capsys.readouterr().out


def test_bad_override_exits_2_naming_the_key(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["config", "demo", "reference.lrr=1"]) == 2
    assert "reference.lrr" in caplog.text and "did you mean" in caplog.text
    assert main(["run", "no-such-config"]) == 2
    assert "packaged config" in caplog.text


def test_stage_commands_take_their_section_keys_bare() -> None:
    assert _scoped("select", ["budget=0.2", "run.seed=1"]) == ["select.budget=0.2", "run.seed=1"]
    assert _scoped("train-ref", ["epochs=1"]) == ["reference.epochs=1"]
    assert _scoped("run", ["budget=0.2"]) == ["budget=0.2"]
