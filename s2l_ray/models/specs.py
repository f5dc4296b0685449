"""Model and tokenizer specs: hub ids, local folders, offline `tiny:<preset>` models and their
pre-trained `tiny-pre:<preset>` twins.

Everything ends in a string that `from_pretrained` accepts, so a tiny offline model and
`EleutherAI/pythia-70m` take exactly the same loading path.
"""

from __future__ import annotations

from pathlib import Path

from s2l_ray.config import ConfigError, S2LConfig


def tokenizer_spec(cfg: S2LConfig) -> str:
    """What the data is tokenized with: data.tokenizer, else the reference's (the first given
    checkpoint's when reference.checkpoints is set)."""
    given = cfg.reference.checkpoints
    return cfg.data.tokenizer or (given[0] if given else cfg.reference.model)


def models_dir(cfg: S2LConfig) -> Path:
    return Path(cfg.run.output_dir) / "models"


def check_spec(spec: str, key: str, weights: bool = True) -> None:
    """Fail early on a spec that cannot load: unknown tiny preset, a missing local folder, or
    (with `weights`) a local model folder without safetensors weights. Only safetensors are
    loaded (`use_safetensors=True`): pickled .bin/.pt weights can run code when unpickled."""
    from s2l_ray.models.tiny import PRESETS, parse_spec

    parsed = parse_spec(spec)
    if parsed is not None:
        family, preset = parsed
        if preset not in PRESETS:
            raise ConfigError(f"config key '{key}': unknown {family} preset '{preset}'. Fix: use"
                              f" one of {', '.join(f'{family}:{p}' for p in PRESETS)}")
        return
    path = Path(spec).expanduser()
    looks_local = spec.startswith(("/", ".", "~")) or path.exists() or spec.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError(f"config key '{key}': '{spec}' is neither a model folder (no "
                          "config.json there) nor a hub id like 'EleutherAI/pythia-70m'. Fix: "
                          "point at a folder saved with save_pretrained, or give a hub id")
    if looks_local and weights and not any(path.glob("*.safetensors")):
        found = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
        raise ConfigError(
            f"config key '{key}': model folder '{spec}' has no *.safetensors weights"
            f"{f' (only {found[:3]})' if found else ''}; s2l_ray loads safetensors only, "
            "because pickled weights can run code when loaded. Fix: convert it once where you "
            "trust the file: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder,"
            " safe_serialization=True)")


def resolve_model(spec: str, cfg: S2LConfig) -> str:
    """A path or hub id for from_pretrained; builds tiny models once under run.output_dir, and
    resolves given checkpoints (hub 'owner/name@revision' ones downloaded under it)."""
    from s2l_ray.models.checkpoints import hub_spec, resolve_checkpoint
    from s2l_ray.models.tiny import resolve_model as resolve

    if hub_spec(spec) or spec in (cfg.reference.checkpoints or ()):
        return resolve_checkpoint(spec, models_dir(cfg) / "hub")
    return resolve(spec, models_dir(cfg))
