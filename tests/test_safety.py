"""Safety: safetensors only, no remote code unless asked, input confined to data.allowed_roots,
secrets kept out of config snapshots and logs, a local Ray's dashboard on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from s2l_ray.config import ConfigError, load_config
from s2l_ray.models.specs import check_spec
from s2l_ray.runtime import REDACTED, redact, setup_logging
from s2l_ray.stages.base import Stage
from s2l_ray.stages.registry import preflight
from s2l_ray.stages.trajectories import TrajectoryError, load_checkpoint, tokenizer_fingerprint
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"instruction": "What is 1+1?", "output": "The answer is 2."}

# ---------------------------------------------------------------------------------------------
# only safetensors weights


def _pickled_copy(tiny_ref: str, dest: Path) -> Path:
    """The tiny model with its weights as pickled pytorch_model.bin, what
    save_pretrained(safe_serialization=False) writes (transformers 5 ignores that flag and
    always writes safetensors, so the file is written the way 4.x did)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_ref, dest)
    weights = dest / "model.safetensors"
    torch.save(load_file(str(weights)), dest / "pytorch_model.bin")
    weights.unlink()
    return dest


def test_check_spec_refuses_a_folder_without_safetensors(tmp_path: Path, tiny_ref: str) -> None:
    folder = _pickled_copy(tiny_ref, tmp_path / "pickled")
    with pytest.raises(ConfigError, match=r"'reference\.model'.*no \*\.safetensors.*"
                                          r"pytorch_model\.bin.*safe_serialization=True"):
        check_spec(str(folder), "reference.model")
    check_spec(str(folder), "data.tokenizer", weights=False)  # a tokenizer needs no weights
    check_spec(tiny_ref, "reference.model")                    # the safetensors original loads
    # ... and the pre-flight check of a whole run stops on it before any work
    cfg = make_cfg(tmp_path, tiny_ref, f"target.model={folder}")
    with pytest.raises(ConfigError, match="target.model"):
        preflight(cfg)


def test_loading_refuses_pickled_weights_even_past_the_check(tmp_path: Path,
                                                             tiny_ref: str) -> None:
    folder = _pickled_copy(tiny_ref, tmp_path / "pickled")
    with pytest.raises(TrajectoryError, match="safetensors"):
        load_checkpoint(str(folder))


# ---------------------------------------------------------------------------------------------
# no remote code unless the config asks

_CUSTOM_CODE = '''
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast


class CustomConfig(GPTNeoXConfig):
    model_type = "s2l_custom"


class CustomModel(GPTNeoXForCausalLM):
    config_class = CustomConfig


class CustomTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def _remote_code_model(tiny_ref: str, dest: Path) -> Path:
    """A model + tokenizer folder that only loads by running its own Python file (auto_map),
    like a hub repository with custom code."""
    dest.mkdir()
    (dest / "custom_neox.py").write_text(_CUSTOM_CODE)
    spec = importlib.util.spec_from_file_location("custom_neox", dest / "custom_neox.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = json.loads((Path(tiny_ref) / "config.json").read_text())
    cfg = mod.CustomConfig(**{k: base[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "bos_token_id", "eos_token_id", "pad_token_id")})
    cfg.auto_map = {"AutoConfig": "custom_neox.CustomConfig",
                    "AutoModelForCausalLM": "custom_neox.CustomModel"}
    mod.CustomModel(cfg).save_pretrained(str(dest))
    shutil.copy(Path(tiny_ref) / "tokenizer.json", dest / "tokenizer.json")
    tok_cfg = json.loads((Path(tiny_ref) / "tokenizer_config.json").read_text())
    tok_cfg.pop("tokenizer_class", None)
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, "custom_neox.CustomTokenizerFast"]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return dest


def test_trust_remote_code_is_off_by_default_everywhere() -> None:
    cfg = load_config()
    assert cfg.reference.trust_remote_code is False and cfg.target.trust_remote_code is False
    for path in [*ROOT.glob("s2l_ray/configs/*.yaml"), *ROOT.glob("cluster_configs/pipeline*")]:
        shipped = load_config(path)
        assert not shipped.reference.trust_remote_code, path
        assert not shipped.target.trust_remote_code, path


def test_remote_code_runs_only_when_asked(tmp_path: Path, tiny_ref: str) -> None:
    from s2l_ray.stages import ingest as ingest

    folder = str(_remote_code_model(tiny_ref, tmp_path / "custom"))
    # The checkpoint loader (trajectories), the tokenizer check and ingest's tokenizer all
    # pass the flag through: off, the custom code is refused; on, it runs.
    with pytest.raises(TrajectoryError, match="custom code"):
        load_checkpoint(folder)
    assert type(load_checkpoint(folder, trust_remote_code=True)).__name__ == "CustomModel"
    with pytest.raises(TrajectoryError, match="custom code"):
        tokenizer_fingerprint(folder)
    assert tokenizer_fingerprint(folder, trust_remote_code=True)
    ingest._TOKENIZERS.pop(folder, None)
    with pytest.raises(ValueError, match="custom code"):
        ingest._tokenizer(folder, False)
    assert type(ingest._tokenizer(folder, True)).__name__ == "CustomTokenizerFast"
    ingest._TOKENIZERS.pop(folder, None)


# ---------------------------------------------------------------------------------------------
# input only from data.allowed_roots


def test_allowed_roots_config() -> None:
    assert load_config().data.allowed_roots is None
    with pytest.raises(ConfigError, match=r"'data\.allowed_roots'.*Fix:"):
        load_config(None, ["data.allowed_roots=[]"])
    with pytest.raises(ConfigError, match=r"'data\.allowed_roots'.*Fix:"):
        load_config(None, ["data.allowed_roots=['']"])
    cfg = load_config(None, ["data.allowed_roots=[data, ~/x]"])
    assert all(os.path.isabs(r) for r in cfg.data.allowed_roots or [])


def test_allowed_roots_refuse_outside_paths_and_symlinks(tmp_path: Path, tiny_ref: str) -> None:
    root, outside = tmp_path / "allowed", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for d in (root / "sub", outside):
        (d / "a.jsonl").write_text(json.dumps(GOOD) + "\n")

    def check(*overrides: str) -> None:
        preflight(make_cfg(tmp_path, tiny_ref, f"data.allowed_roots=[{root}]", *overrides))

    check(f"data.source={root / 'sub'}", f"data.eval_source={root / 'sub' / 'a.jsonl'}")
    check("data.source=demo:mathmix", "data.eval_source=hf:some-org/some-dataset")  # not paths
    with pytest.raises(ConfigError, match=r"'data\.source'.*outside data\.allowed_roots.*Fix:"):
        check(f"data.source={outside / 'a.jsonl'}")
    with pytest.raises(ConfigError, match=r"'data\.eval_source'.*outside"):
        check(f"data.source={root / 'sub'}", f"data.eval_source={outside / 'a.jsonl'}")
    with pytest.raises(ConfigError, match=r"'data\.source'.*outside"):
        check(f"data.source={root / 'sub' / '..' / '..' / 'elsewhere'}")  # .. is resolved
    with pytest.raises(ConfigError, match=r"'data\.source'.*outside"):
        check(f"data.source=hf:{outside}")  # a local Hugging Face folder is a path too
    # Symlinks are followed: a link to the outside, or a folder that holds one, is refused.
    (root / "link.jsonl").symlink_to(outside / "a.jsonl")
    with pytest.raises(ConfigError, match=r"resolves to .*elsewhere"):
        check(f"data.source={root / 'link.jsonl'}")
    (root / "sub" / "linked_dir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"linked_dir.*resolves to .*elsewhere"):
        check(f"data.source={root / 'sub'}")
    # Without allowed_roots, anything goes.
    preflight(make_cfg(tmp_path, tiny_ref, f"data.source={outside}"))


def test_allowed_roots_refusal_through_the_cli(tmp_path: Path, tiny_ref: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from s2l_ray.cli import main

    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "root").mkdir()
    out = tmp_path / "out"
    assert main(["ingest", "demo", f"run.output_dir={out}", f"reference.model={tiny_ref}",
                 f"data.source={tmp_path / 'a.jsonl'}",
                 f"data.allowed_roots=[{tmp_path / 'root'}]"]) == 2
    assert "data.allowed_roots" in caplog.text and "Fix:" in caplog.text
    assert not out.exists()  # refused before any work


# ---------------------------------------------------------------------------------------------
# secrets: never in snapshots, redacted from logs

SECRETS = {"HF_TOKEN": "hf_" + "Ab1" * 10, "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPx",
           "MY_DB_PASSWORD": "correct horse battery"}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    return SECRETS


def test_stage_snapshot_holds_no_secret(tmp_path: Path, secret_env: dict[str, str]) -> None:
    cfg = make_cfg(tmp_path, "tiny:nano")
    stage = Stage(cfg, "probe", ("run", "data", "reference"))
    stage.begin()
    stage.publish({"note": "a stage's own report"})  # writes config.yaml, report, marker
    published = "".join(f.read_text() for f in stage.path.iterdir() if f.is_file())
    assert "output_dir" in published  # the snapshot is there ...
    for value in secret_env.values():
        assert value not in published  # ... and no secret in it


def test_redact_hides_secret_env_values_and_hub_tokens(secret_env: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_KEY", "abc")       # too short to redact without hitting words
    monkeypatch.setenv("PLAIN_SETTING", "visible-value-123")
    text = " | ".join([*secret_env.values(), "hf_" + "Z" * 24, "abc", "visible-value-123"])
    out = redact(text)
    for value in secret_env.values():
        assert value not in out
    assert "hf_ZZZZ" not in out and out.count(REDACTED) == 4
    assert "abc" in out and "visible-value-123" in out


def test_s2l_logs_are_redacted(secret_env: dict[str, str],
                               caplog: pytest.LogCaptureFixture) -> None:
    setup_logging("INFO")
    log = logging.getLogger("s2l_ray.some_module")
    with caplog.at_level(logging.INFO, logger="s2l_ray"):
        log.info("loading with token %s", secret_env["HF_TOKEN"])
        try:
            raise RuntimeError(f"login failed for {secret_env['AWS_SECRET_ACCESS_KEY']}")
        except RuntimeError:
            log.exception("upload failed")
    assert "loading with token" in caplog.text and "login failed" in caplog.text
    assert REDACTED in caplog.text
    for value in secret_env.values():
        assert value not in caplog.text


# ---------------------------------------------------------------------------------------------
# a local Ray listens on 127.0.0.1


@pytest.mark.ray
def test_local_dashboard_listens_on_loopback(ray_local) -> None:
    from ray._private.worker import get_dashboard_url

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("joined an existing cluster: not local mode")
    url = get_dashboard_url()
    assert url.split("://")[-1].startswith("127.0.0.1:"), url
