"""Safety: safetensors only, no remote code unless asked, input confined to data.allowed_roots,
secrets kept out of config snapshots and logs, a local Ray's dashboard on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import itertools
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


# ---------------------------------------------------------------------------------------------
# secrets in run.storage_uri: refused, never echoed; pyarrow's errors redacted and unchained

URI_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY"  # an AWS-style secret, '/' and '+' included


@pytest.mark.parametrize("uri", [
    f"s3://AKIAIOSFODNN7EXAMPLE:{URI_SECRET}@bucket/prefix",   # '/' in the secret
    f"gs://user:{URI_SECRET}@bucket/prefix",
    f"s3://bucket/prefix?access_key=AKIAIOSFODNN7EXAMPLE&secret_key={URI_SECRET}",
    f"s3://bucket/prefix?region=eu-west-1&session_token={URI_SECRET}",
    f"gs://bucket/prefix?X-Goog-Signature={URI_SECRET}",
    f"s3://AKIAIOSFODNN7EXAMPLE:{URI_SECRET}",                 # no '@' at all: KEY:SECRET/...
])
def test_storage_uri_credentials_refused_never_echoed(
        tmp_path: Path, uri: str, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    from s2l_ray.cli import main

    with pytest.raises(ConfigError, match=r"run\.storage_uri.*carries credentials.*Fix:") as e:
        load_config(None, [f"run.output_dir={tmp_path}", f"run.storage_uri={uri}"])
    assert "wJalr" not in str(e.value) and "RfiCY" not in str(e.value)
    caplog.clear()
    assert main(["config", f"run.output_dir={tmp_path}", f"run.storage_uri={uri}"]) == 2
    printed = capsys.readouterr()
    assert "carries credentials" in caplog.text
    for text in (printed.out, printed.err, caplog.text):
        assert "wJalr" not in text and "RfiCY" not in text


def test_storage_errors_are_redacted_and_unchained(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's own exception (its message may hold the URI) is not chained onto ours, and
    ours names the URI redacted."""
    import traceback

    from s2l_ray.io.storage import StorageError, push

    secret = "s3cretPathToken123"
    monkeypatch.setenv("S2L_TEST_TOKEN", secret)
    # Passes our checks; pyarrow refuses the unknown parameter.
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}",
                             f"run.storage_uri=s3://bucket/{secret}/p?bogus=1"])
    stage = Stage(cfg, "probe", ("select",))
    stage.begin()
    with pytest.raises(StorageError, match="run.storage_uri") as e:
        stage.publish({})  # uploads after publishing locally
    assert e.value.__cause__ is None and e.value.__suppress_context__
    text = "".join(traceback.format_exception(e.value))
    assert secret not in text and REDACTED in text
    with pytest.raises(StorageError) as e:
        push(stage)
    assert secret not in str(e.value)


def test_cli_failure_traceback_is_redacted(tmp_path: Path, tiny_ref: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A storage failure through the CLI: reported with the URI redacted."""
    from s2l_ray.cli import main

    secret = "s3cretPathToken456"
    monkeypatch.setenv("S2L_TEST_TOKEN", secret)
    caplog.clear()
    rc = main(["ingest", "demo", f"run.output_dir={tmp_path / 'out'}",
               f"reference.model={tiny_ref}", f"run.storage_uri=s3://bucket/{secret}?bogus=1"])
    assert rc != 0 and "ingest" in caplog.text and REDACTED in caplog.text
    printed = capsys.readouterr()
    for text in (printed.out, printed.err, caplog.text):
        assert secret not in text


def test_s2l_config_output_is_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from s2l_ray.cli import main

    secret = "s3cretFolderToken789"
    monkeypatch.setenv("S2L_TEST_TOKEN", secret)
    assert main(["config", f"data.source=/data/{secret}/train.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "source: /data/[REDACTED]/train.jsonl" in out and secret not in out


def test_other_libraries_log_records_are_redacted(secret_env: dict[str, str]) -> None:
    """Records of any logger (here one named like pyarrow's) are redacted, whatever handler
    writes them, one added to the root logger after setup_logging included."""
    import io

    setup_logging("INFO")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(handler)
    try:
        other = logging.getLogger("pyarrow.fs.some_module")
        other.warning("request with key %s failed", secret_env["AWS_SECRET_ACCESS_KEY"])
        try:
            raise OSError(f"GET s3://AKIA:{secret_env['AWS_SECRET_ACCESS_KEY']}@b/x")
        except OSError:
            other.exception("boom")
    finally:
        logging.getLogger().removeHandler(handler)
    text = buf.getvalue()
    assert "request with key" in text and "boom" in text and REDACTED in text
    assert "Traceback" in text
    for value in secret_env.values():
        assert value not in text


# ---------------------------------------------------------------------------------------------
# hostile YAML: alias bombs, huge values, duplicate keys


def _bomb(levels: int) -> str:
    """The 'billion laughs' as one flow value: each anchor repeats the previous one 9 times,
    so the last holds 9**levels values once expanded (a few hundred bytes of text)."""
    names = "abcdefghij"
    parts = ["&a [x, x, x, x, x, x, x, x, x]"]
    for prev, cur in itertools.pairwise(names[:levels]):
        parts.append(f"&{cur} [{', '.join(['*' + prev] * 9)}]")
    return f"[{', '.join(parts)}]"


def test_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    import time

    f = tmp_path / "bomb.yaml"
    f.write_text(f"data:\n  max_length: {_bomb(9)}\n")  # 387,420,489 values once expanded
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*expands to more than .*Fix:") as e:
        load_config(f)
    assert time.perf_counter() - started < 5  # loose: a guard against a hang only
    assert len(str(e.value)) < 400
    # An override value is bounded the same way.
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(None, [f"data.max_length={_bomb(9)}"])


def test_bad_value_is_echoed_as_a_short_prefix(tmp_path: Path) -> None:
    f = tmp_path / "cfg.yaml"
    f.write_text(f"data:\n  max_length: {_bomb(4)}\n")  # 7,380 values: bounded, wrong type
    with pytest.raises(ConfigError, match=r"data\.max_length.*expects int") as e:
        load_config(f)
    assert len(str(e.value)) < 400
    huge = "x" * 100_000
    for override in (f"data.max_length={huge}", f"sweep.methods=[{huge}]",
                     f"data.{huge}=1", f"run.output_dir=s3://{huge}"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert len(str(e.value)) < 600, override
    with pytest.raises(ConfigError, match="cannot be read"):  # over Python's int digit limit
        load_config(None, ["data.max_length=" + "9" * 5000])
    with pytest.raises(ConfigError, match="too deep|deeper"):
        load_config(None, ["data.max_length=" + "[" * 5000 + "]" * 5000])
    f.write_text("data:\n  allowed_roots: &r [*r]\n")
    with pytest.raises(ConfigError, match=r"data\.allowed_roots\[0\]' contains itself"):
        load_config(f)


def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path: Path) -> None:
    f = tmp_path / "cfg.yaml"
    f.write_text("data:\n  source: a.jsonl\n  max_length: 64\n  source: b.jsonl\n")
    with pytest.raises(ConfigError, match=r"key 'data\.source' appears twice \(lines 2 and 4\)"
                                          r".*Fix: keep one"):
        load_config(f)
    f.write_text("select:\n  budget: 0.1\nselect:\n  method: random\n")
    with pytest.raises(ConfigError, match=r"key 'select' appears twice"):
        load_config(f)
    f.write_text("base: &b {budget: 0.1}\nselect:\n  <<: *b\n  method: random\n")
    with pytest.raises(ConfigError, match="'base'"):  # merge keys are fine; 'base' is unknown
        load_config(f)


def ray_listening_sockets() -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of this process (a Ray driver
    has a gRPC server too) and the processes it started (the local Ray: GCS, raylet,
    dashboard, agents, workers)."""
    import psutil

    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.Error:
                name = "?"
            found.append((c.laddr.ip, c.laddr.port, name))
    return found


@pytest.mark.ray
def test_local_ray_listens_only_on_loopback(ray_local) -> None:
    import ipaddress

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("joined an existing cluster: not local mode")

    @ray_local.remote
    def ping() -> int:  # a worker up too, with its own gRPC server
        return os.getpid()

    ray_local.get(ping.remote())
    sockets = ray_listening_sockets()
    names = {name for _, _, name in sockets}
    assert len(sockets) >= 5 and any("raylet" in n for n in names), sockets  # sees Ray's
    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)  # ::ffff:127.0.0.1 is IPv4 loopback on a v6 socket
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback

    outside = [s for s in sockets if not loopback(s[0])]
    assert outside == [], f"listening beyond loopback: {outside}"
