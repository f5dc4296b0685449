"""Typed config: strict loading, clear errors naming key and fix, every shipped YAML loads."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from s2l_ray.config import (
    ConfigError,
    S2LConfig,
    dump_config,
    field_docs,
    load_config,
    parse_override,
    reference_table,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("s2l_ray/configs/*.yaml"),
                  *ROOT.glob("cluster_configs/pipeline*.yaml")])


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.select.budget == 0.1 and cfg.reference.zero_stage == 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_starts_with_its_command(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, S2LConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("s2l " in first or "ray job submit" in first), first


def test_shipped_yaml_found() -> None:
    assert any(p.name == "demo.yaml" for p in SHIPPED)


def test_unknown_key_names_key_and_suggests(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("reference:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'reference\.lrr'.*did you mean 'reference\.lr'"):
        load_config(f)


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match=r"'clustering'.*did you mean 'cluster'"):
        load_config(None, ["clustering.k=5"])


@pytest.mark.parametrize(("override", "key"), [
    ("reference.epochs=two", "reference.epochs"),
    ("reference.epochs=1.5", "reference.epochs"),
    ("run.overwrite=yes please", "run.overwrite"),
    ("data.overlong=drop", "data.overlong"),
    ("sweep.budgets=0.1", "sweep.budgets"),
    ("reference.use_gpu=1", "reference.use_gpu"),
])
def test_wrong_types_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}'.*Fix:"):
        load_config(None, [override])


@pytest.mark.parametrize(("override", "key"), [
    ("reference.zero_stage=4", "reference.zero_stage"),
    ("reference.num_workers=0", "reference.num_workers"),
    ("target.lr=3", "target.lr"),
    ("reference.checkpoint_steps=[5, 3]", "reference.checkpoint_steps"),
    ("select.budget=1.5", "select.budget"),
    ("select.budget=0.0", "select.budget"),
    ("select.budget=0", "select.budget"),
    ("cluster.k=0", "cluster.k"),
    ("data.max_length=4", "data.max_length"),
    ("sweep.methods=[s2l, magic]", "sweep.methods"),
    ("trajectories.batch_tokens=32", "trajectories.batch_tokens"),
])
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}'.*Fix:"):
        load_config(None, [override])


def test_trajectory_batch_tokens_default_per_device() -> None:
    """null: 65536 tokens per batch on a GPU, 16384 on CPU; a number is taken as given."""
    t = load_config(None, []).trajectories
    assert t.batch_tokens is None
    assert (t.tokens_per_batch(True), t.tokens_per_batch(False)) == (65536, 16384)
    t = load_config(None, ["trajectories.batch_tokens=512"]).trajectories
    assert (t.tokens_per_batch(True), t.tokens_per_batch(False)) == (512, 512)


def test_budget_int_is_count_float_is_fraction() -> None:
    assert load_config(None, ["select.budget=5000"]).select.budget == 5000
    assert isinstance(load_config(None, ["select.budget=5000"]).select.budget, int)
    assert load_config(None, ["select.budget=1.0"]).select.budget == 1.0
    assert isinstance(load_config(None, ["select.budget=1.0"]).select.budget, float)


def test_ints_widen_to_float_and_lists_parse() -> None:
    cfg = load_config(None, ["reference.warmup_ratio=0", "sweep.budgets=[0.1, 500]",
                             "run.ray_address=auto"])
    assert cfg.reference.warmup_ratio == 0.0 and isinstance(cfg.reference.warmup_ratio, float)
    assert cfg.sweep.budgets == [0.1, 500] and isinstance(cfg.sweep.budgets[1], int)
    assert cfg.run.ray_address == "auto"


def test_exponent_floats_without_a_dot_are_floats() -> None:
    # PyYAML follows YAML 1.1, where '3e-3' is a string; users mean 0.003
    assert load_config(None, ["reference.lr=3e-3"]).reference.lr == 0.003
    with pytest.raises(ConfigError, match="reference.epochs"):
        load_config(None, ["reference.epochs=3e2"])


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("select.budget")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override(".x=1")
    with pytest.raises(ConfigError, match=r"'run\.seed': expects int"):
        load_config(None, ["run.seed.x=1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_snapshot_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["select.budget=300", "reference.checkpoint_steps=[2, 4]"])
    f = tmp_path / "snap.yaml"
    dump_config(cfg, f)
    assert load_config(f) == cfg


def test_fingerprint_tracks_only_its_sections() -> None:
    a = load_config()
    b = load_config(None, ["select.budget=0.5"])
    assert a.fingerprint("data", "reference") == b.fingerprint("data", "reference")
    assert a.fingerprint("select") != b.fingerprint("select")


def test_every_field_has_a_docstring() -> None:
    hints = typing.get_type_hints(S2LConfig)
    for section in dataclasses.fields(S2LConfig):
        cls = hints[section.name]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring"
    table = reference_table()
    assert "`select.budget`" in table and "`reference.zero_stage`" in table


def test_relative_output_dir_becomes_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.output_dir=out/demo"])
    assert cfg.run.output_dir == str(tmp_path / "out" / "demo")


def test_readme_reference_table_is_current() -> None:
    """The README's key table is `s2l config --reference`: regenerate it when a key changes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_table() in readme, "README.md's configuration table is stale: paste the " \
        "output of `s2l config --reference` under 'Configuration reference'"
