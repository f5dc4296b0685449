"""Your own reference checkpoints (`reference.checkpoints`): local folders or hub ids with a
revision, `EleutherAI/pythia-70m@step1000`, resolved to local folders that `from_pretrained`
loads, and checked like the trajectory stage checks its own (same tokenizer, logits from the
output head, safetensors only) before any scoring.

Hub checkpoints are downloaded (safetensors, config and tokenizer files only: never pickled
weights) into `<run.output_dir>/models/hub/<owner>--<name>@<revision>/`, inside the run's folder,
which several nodes see when it is shared, like the reference checkpoints this project trains.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from s2l_ray.config import ConfigError

log = logging.getLogger(__name__)
HUB_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<rev>[\w./-]+)$")
# What a checkpoint needs to load: never *.bin / *.pt (pickles can run code when loaded).
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json",
             "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
             "merges.txt", "*.model"]


def hub_spec(spec: str) -> tuple[str, str] | None:
    """'owner/name@rev' -> (repo, revision); anything else (a folder, 'tiny:...') -> None."""
    if Path(spec).expanduser().exists():
        return None
    m = HUB_SPEC.match(spec)
    return (m["repo"], m["rev"]) if m else None


def step_of(spec: str, index: int) -> int:
    """The training step a checkpoint stands for: Pythia-style 'step1000' in its revision or
    folder name, else its position (1, 2, ...): the x axis of the trajectory plots."""
    name = hub_spec(spec)[1] if hub_spec(spec) else Path(spec).name
    m = re.search(r"(?:step|checkpoint)[_-]?0*(\d+)", name)
    return int(m[1]) if m else index + 1


def check_checkpoint_specs(specs: list[str], key: str = "reference.checkpoints") -> None:
    """Before any work: every local folder loads (config.json, safetensors weights), every other
    spec is a hub id with a revision."""
    from s2l_ray.models.specs import check_spec

    for i, spec in enumerate(specs):
        if hub_spec(spec):
            continue
        path = Path(spec).expanduser()
        if not path.exists() and "/" in spec and not spec.startswith(("/", ".", "~")):
            raise ConfigError(f"config key '{key}[{i}]': '{spec}' is not a folder here, and as a "
                              "hub id it names no revision. Fix: write owner/name@revision "
                              "(e.g. EleutherAI/pythia-70m@step1000; '@main' for the latest), "
                              "or a model folder")
        check_spec(str(path), f"{key}[{i}]")


def resolve_checkpoint(spec: str, hub_dir: Path) -> str:
    """A local folder for `spec`: itself (absolute), or the hub checkpoint downloaded once into
    hub_dir. Raises ConfigError when the download holds no safetensors weights."""
    hub = hub_spec(spec)
    if hub is None:
        return str(Path(spec).expanduser().resolve())
    repo, rev = hub
    dest = hub_dir / f"{repo.replace('/', '--')}@{rev.replace('/', '--')}"
    if not (dest / ".complete").is_file():
        from huggingface_hub import snapshot_download

        log.info("reference.checkpoints: downloading %s at revision %s to %s", repo, rev, dest)
        try:
            snapshot_download(repo, revision=rev, local_dir=str(dest), allow_patterns=HUB_FILES)
        except Exception as e:
            raise ConfigError(f"config key 'reference.checkpoints': cannot download '{spec}' "
                              f"({type(e).__name__}: {str(e)[:300]}). Fix: check the id and "
                              "revision, the network, and HF_TOKEN for gated models") from e
        if not any(dest.glob("*.safetensors")):
            raise ConfigError(f"config key 'reference.checkpoints': '{spec}' has no "
                              "*.safetensors weights at that revision; s2l_ray loads safetensors "
                              "only (pickled weights can run code when loaded). Fix: convert it "
                              "once where you trust the file (from_pretrained(...)."
                              "save_pretrained(folder, safe_serialization=True)) and list the "
                              "folder instead")
        (dest / ".complete").write_text(spec)
    return str(dest)


def check_given_checkpoints(paths: list[str], data_tokenizer: str | None,
                            trust_remote_code: bool = False) -> None:
    """The trajectory stage's checks, on EVERY given checkpoint (they may differ in kind, unlike
    the ones this project trains): one tokenizer across them and the data, weights that load
    completely, logits from the output head. Raises TrajectoryError naming the checkpoint."""
    from s2l_ray.core.losses import head_path_check
    from s2l_ray.stages.trajectories import TrajectoryError, check_checkpoints, load_checkpoint

    check_tokenizers(paths, trust_remote_code)  # no model loaded yet
    check_checkpoints(paths[:1], data_tokenizer, trust_remote_code)  # vs the data's tokenizer
    for p in paths[1:]:
        model = load_checkpoint(p, trust_remote_code)
        ours, hf = head_path_check(model)
        if not abs(ours - hf) <= 1e-3 * max(1.0, abs(hf)):
            raise TrajectoryError(
                f"checkpoint {p}: {type(model).__name__} post-processes its logits (loss "
                f"{ours:.5f} from the output head, {hf:.5f} from the model). Fix: use a "
                "reference whose logits are lm_head(last hidden state), e.g. Pythia or Llama")


def check_tokenizers(paths: list[str], trust_remote_code: bool = False) -> None:
    """Every checkpoint has the first one's tokenizer (no model is loaded)."""
    from s2l_ray.stages.trajectories import same_tokenizer

    same_tokenizer(paths, trust_remote_code, "list checkpoints of one model family that share "
                   "a tokenizer (reference.checkpoints)")


def manifest_for(specs: list[str], paths: list[str]) -> list[dict[str, Any]]:
    """The train_ref manifest of given checkpoints: absolute paths, no training history."""
    return [{"index": i, "step": step_of(s, i), "epoch": None, "train_loss": None,
             "probe_loss": None, "lr": None, "attempt_start_step": None, "path": p,
             "given": s} for i, (s, p) in enumerate(zip(specs, paths))]
