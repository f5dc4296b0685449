"""Tests for the offline tiny models and tokenizer (no Ray, no network)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from s2l_ray.models.tiny import (  # noqa: E402  (after the importorskip guards)
    PRESETS,
    PRETRAIN,
    build_pretrained_model,
    build_tiny_model,
    build_tokenizer,
    cache_name,
    resolve_model,
)


@pytest.fixture(scope="module")
def nano_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "nano", preset="nano")


@pytest.fixture(scope="module")
def tokenizer(nano_dir: str):
    return transformers.AutoTokenizer.from_pretrained(nano_dir)


def test_digits_are_single_tokens(tokenizer) -> None:
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == list("12345")
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("x = 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]
    assert all(not any(c.isdigit() for c in p) or len(p) == 1 for p in pieces)


@pytest.mark.parametrize("text", [
    "What is 37 + 48?\nThe answer is 85.",
    "Solve for x: 3x - 5 = -20. Subtract ... both sides: x = -5. The answer is -5.",
    "  spaces   and\ttabs , before . punctuation !? ( 7/12 ) $12.50 {braces} [x]\n\n",
    "Unseen words: zygote quixotic, CAPS, under_score, #hash, 100%.",
])
def test_decode_encode_round_trip(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 1024
    # Like Pythia's tokenizer, encoding adds no special tokens by itself.
    assert tokenizer.eos_token_id not in tokenizer.encode("The answer is 5.")


def test_tokenizer_is_deterministic(tmp_path: Path, nano_dir: str) -> None:
    build_tokenizer(tmp_path / "again", vocab_size=512, seed=0)
    again = (tmp_path / "again" / "tokenizer.json").read_bytes()
    assert again == (Path(nano_dir) / "tokenizer.json").read_bytes()
    build_tokenizer(tmp_path / "other", vocab_size=300, seed=0)  # the corpus yields ~370
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() != again


def test_tokenizer_is_deterministic_across_processes(tmp_path: Path, nano_dir: str) -> None:
    # The tokenizers library is Rust, whose hash maps are seeded per process: a real risk.
    root = Path(__file__).resolve().parents[2]
    code = f"from s2l_ray.models.tiny import build_tokenizer; build_tokenizer({str(tmp_path)!r})"
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        Path(nano_dir) / "tokenizer.json").read_bytes()


def test_model_round_trip(nano_dir: str, tokenizer) -> None:
    files = set(os.listdir(nano_dir))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    model = transformers.AutoModelForCausalLM.from_pretrained(nano_dir)
    cfg = model.config
    assert cfg.model_type == "gpt_neox" and cfg.hidden_size == PRESETS["nano"]["hidden_size"]
    assert cfg.vocab_size % 8 == 0 and cfg.vocab_size >= len(tokenizer)
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = tokenizer(["What is 1 + 2?", "Evaluate (3 + 4) * 5 - 6."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    again = transformers.AutoModelForCausalLM.from_pretrained(nano_dir).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again[name]), name


def test_build_is_deterministic_and_keeps_global_rng(tmp_path: Path, nano_dir: str) -> None:
    from safetensors.torch import load_file

    state = torch.random.get_rng_state()
    build_tiny_model(tmp_path / "a", preset="nano", tokenizer_dir=nano_dir)
    assert torch.equal(state, torch.random.get_rng_state())
    ref = load_file(str(Path(nano_dir) / "model.safetensors"))
    same = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert ref.keys() == same.keys() and all(torch.equal(ref[k], same[k]) for k in ref)
    build_tiny_model(tmp_path / "b", preset="nano", tokenizer_dir=nano_dir, seed=1)
    other = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert not all(torch.equal(ref[k], other[k]) for k in ref)


def test_existing_dir_of_other_preset_is_refused(nano_dir: str) -> None:
    assert build_tiny_model(nano_dir, preset="nano") == nano_dir  # reused as is
    with pytest.raises(ValueError, match="micro"):
        build_tiny_model(nano_dir, preset="micro")


def test_resolve_model_builds_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = resolve_model("tiny:nano", cache)
    assert path == str(cache / cache_name("tiny", "nano"))
    weights = Path(path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model("tiny:nano", cache) == path
    assert weights.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(cache)) == [cache_name("tiny", "nano")]  # no temp dirs left behind
    transformers.AutoModelForCausalLM.from_pretrained(path)


def test_resolve_model_replaces_incomplete_dir(tmp_path: Path) -> None:
    target = tmp_path / cache_name("tiny", "nano")
    target.mkdir()
    (target / "config.json").write_text("{}")  # a crashed build from before
    assert resolve_model("tiny:nano", tmp_path) == str(target)
    assert (target / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == [cache_name("tiny", "nano")]


def test_resolve_model_passes_other_specs_through(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolve_model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cache = tmp_path / "cache"
    assert resolve_model("EleutherAI/pythia-70m", cache) == "EleutherAI/pythia-70m"
    assert resolve_model("/models/my-local-model", cache) == "/models/my-local-model"
    assert not cache.exists()


def test_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nano"):
        resolve_model("tiny:huge", tmp_path)
    with pytest.raises(ValueError, match="micro"):
        build_tiny_model(tmp_path / "m", preset="huge")
    assert not (tmp_path / "m").exists()


def test_preset_shapes() -> None:
    assert set(PRESETS) >= {"nano", "micro", "small", "base"}
    for cfg in PRESETS.values():
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
        assert cfg["intermediate_size"] == 4 * cfg["hidden_size"]
        assert cfg["rotary_pct"] == 0.25 and cfg["use_parallel_residual"]
        assert not cfg["tie_word_embeddings"]


def _statement_loss(model_dir: str, texts: list[str]) -> float:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    losses = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tok.eos_token_id, *tok(t)["input_ids"]]])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def test_pretrained_preset_builds_deterministically_and_learns(tmp_path: Path) -> None:
    from s2l_ray.demo.data import pretraining_corpus

    a = build_pretrained_model(tmp_path / "a", preset="nano", steps=60)
    b = build_pretrained_model(tmp_path / "b", preset="nano", steps=60)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    info = json.loads((Path(a) / "pretraining.json").read_text())
    assert info["steps"] == 60 and info["last_loss"] < info["first_loss"]
    # It learned the statements' language: lower loss than its random-init twin on statements
    # it never read (another seed's corpus).
    unseen = pretraining_corpus(seed=7, n=40)
    rand = build_tiny_model(tmp_path / "rand", preset="nano")
    assert _statement_loss(a, unseen) < 0.8 * _statement_loss(rand, unseen)
    # Same tokenizer as the random-init presets: one ingest serves both kinds of model.
    assert (Path(a) / "tokenizer.json").read_bytes() == (
        Path(rand) / "tokenizer.json").read_bytes()


def test_resolve_pretrained_preset_uses_the_shared_cache(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRETRAIN, "nano", {**PRETRAIN["nano"], "steps": 20})
    monkeypatch.setenv("S2L_RAY_CACHE", str(tmp_path / "shared"))
    run_cache = tmp_path / "run" / "models"
    path = resolve_model("tiny-pre:nano", run_cache)
    assert path == str(tmp_path / "shared" / "models" / cache_name("tiny-pre", "nano"))
    assert not run_cache.exists()  # built once per machine, not per run
    model = transformers.AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert model.config.hidden_size == PRESETS["nano"]["hidden_size"]
    mtime = os.stat(Path(path) / "model.safetensors").st_mtime_ns
    assert resolve_model("tiny-pre:nano", run_cache) == path  # reused, not rebuilt
    assert os.stat(Path(path) / "model.safetensors").st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path / "shared" / "models")) == [cache_name("tiny-pre", "nano")]
    with pytest.raises(ValueError, match="nano"):
        resolve_model("tiny-pre:huge", run_cache)


def test_cache_name_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cached model is reused only if it was built by the same recipe: a release that changes
    # the pre-training (or the corpora, or the shapes) must not load yesterday's weights.
    name, micro = cache_name("tiny-pre", "small"), cache_name("tiny-pre", "micro")
    assert name.startswith("tiny-pre-small-") and name == cache_name("tiny-pre", "small")
    assert cache_name("tiny", "small").startswith("tiny-small-")
    assert len({cache_name(f, p) for f in ("tiny", "tiny-pre") for p in PRESETS}) == 8
    monkeypatch.setitem(PRETRAIN, "small", {**PRETRAIN["small"], "steps": 7})
    assert cache_name("tiny-pre", "small") != name
    assert cache_name("tiny-pre", "micro") == micro  # only the changed preset moves
    import s2l_ray.demo.data as data

    monkeypatch.setattr(data, "pretraining_corpus", lambda seed, n: ["1 plus 1 is 2."] * n)
    assert cache_name("tiny-pre", "micro") != micro  # a changed corpus: a new model
