"""Offline tiny models and tokenizer, so that the whole pipeline runs with no network.

`resolve_model("tiny:micro", cache_dir)` returns a local directory that
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained` load exactly as they would
a hub id such as "EleutherAI/pythia-70m": a GPT-NeoX (Pythia-shaped) model with random weights and
a byte-level BPE tokenizer trained on the demo data. Random weights are enough for the demo: S2L
only needs the small model's loss trajectories to differ between kinds of example, which they do
as soon as the model trains for a few steps.

Parameter counts with the default tokenizer (at most 512 tokens; the demo's small corpus yields
370, padded to 376; embed_in and embed_out are separate, as in Pythia):

    preset  hidden/layers/heads  total      non-embedding
    nano    32/2/2                  49,536         25,472
    micro   64/2/4                 148,224        100,096
    small   128/4/4                889,600        793,344
    base    256/6/8              4,931,584      4,739,072

(For scale: pythia-70m is 70M total, 19M non-embedding; "base" is about 1/14 of it.)

`tiny-pre:<preset>` is the same model after a short pre-training (`PRETRAIN`) on
`demo.data.pretraining_corpus`: plain statements of number facts ("12 plus 7 is 19.") in forms
that never occur in the demo's instructions. Like the LLMs of the S2L paper, such a target already
knows the easy things before fine-tuning, so fine-tuning teaches the task rather than arithmetic
from scratch. It is built once per machine (seeded, deterministic on a given machine and thread
count) into the shared cache (`S2L_RAY_CACHE`, default ~/.cache/s2l_ray), logging its progress.
Cached folders are named by the preset and a digest of its recipe (`cache_name`), so a release
that changes the shapes, the pre-training or the corpora builds new models instead of reusing
stale ones.

torch, transformers and tokenizers are imported inside the functions so that importing this
module (for example from the CLI) stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

_SHAPES = {"nano": (32, 2, 2), "micro": (64, 2, 4), "small": (128, 4, 4), "base": (256, 6, 8)}
PRESETS: dict[str, dict[str, Any]] = {
    name: {
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * h,
        "max_position_embeddings": 1024,
        "rotary_pct": 0.25,  # Pythia rotates a quarter of each head's dimensions
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
    }
    for name, (h, layers, heads) in _SHAPES.items()
}
# Pre-training of the tiny-pre:* presets: steps of `batch` packed sequences (each a few
# statements), AdamW at peak `lr` (warmup 5%, linear decay to 10%). Sized to take tens of seconds
# on a 2-core laptop CPU: small presets read more statements in that time than large ones.
# "small" (the demo's target) takes 400 steps (~60 s): at 200 or 300 it had not yet learned the
# doubling/halving facts, and fine-tuning did not teach them from the demo's few rows
# (validation study in benchmarks/results/demo_cpu.md).
PRETRAIN: dict[str, dict[str, Any]] = {
    "nano": {"steps": 400, "batch": 32, "lr": 3e-3, "statements": 4},
    "micro": {"steps": 200, "batch": 32, "lr": 3e-3, "statements": 4},
    "small": {"steps": 400, "batch": 32, "lr": 3e-3, "statements": 4},
    "base": {"steps": 150, "batch": 32, "lr": 1e-3, "statements": 4},
}
# Bump when build_tiny_model, build_tokenizer or pretrain change what they build in a way the
# digest's inputs (shapes, PRETRAIN, samples of both corpora) do not show.
RECIPE_VERSION = 1
EOS_TOKEN = "<|endoftext|>"  # eos and bos, as in Pythia
PAD_TOKEN = "<|padding|>"
MODEL_MAX_LENGTH = 1024
TINY_PREFIX = "tiny:"
PRETRAINED_PREFIX = "tiny-pre:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512,
                    seed: int = 0) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on demo_data.tokenizer_corpus(seed) and saves it to out_dir.

    Digits are split into single tokens before BPE runs, so numbers are always spelled digit by
    digit: a tiny model can then learn arithmetic-like patterns instead of memorising multi-digit
    tokens, and every digit of an answer gets its own loss term.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from s2l_ray.demo.data import tokenizer_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1, like Pythia's tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x, spaces before "." included
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    _portable_tokenizer_class(Path(out_dir))
    logger.info("built tokenizer (%d tokens) in %s", len(fast), out_dir)
    return fast


def _portable_tokenizer_class(out_dir: Path) -> None:
    """Names the tokenizer class so that transformers 4.x loads it too.

    transformers 5 writes its own class name "TokenizersBackend", which 4.x does not know;
    "PreTrainedTokenizerFast" is understood by both (5.x aliases it).
    """
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") != "PreTrainedTokenizerFast":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_complete(model_dir: Path) -> bool:
    names = ("config.json", "model.safetensors", *_TOKENIZER_FILES)
    return all((model_dir / n).is_file() for n in names)


def _check_preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; choose one of {sorted(PRESETS)} "
                         f"(e.g. 'tiny:micro')")
    return PRESETS[preset]


def build_tiny_model(out_dir: str | os.PathLike, preset: str = "micro",
                     tokenizer_dir: str | os.PathLike | None = None, seed: int = 0,
                     vocab_size: int = 512) -> str:
    """Builds (or reuses) a randomly initialised GPT-NeoX model of `preset` in out_dir.

    The tokenizer is loaded from tokenizer_dir when given, otherwise trained into out_dir.
    Returns str(out_dir).
    """
    shape = _check_preset(preset)
    out = Path(out_dir)
    if _is_complete(out):
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        mismatch = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")
                    if cfg.get(k) != shape[k]]
        if mismatch:  # reusing another preset's weights silently would skew every result
            raise ValueError(f"{out} already holds a model that is not preset {preset!r} "
                             f"(differs in {mismatch}); delete it or pick another directory")
        logger.info("reusing tiny model in %s", out)
        return str(out)

    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(out))
    else:
        tokenizer = build_tokenizer(out, vocab_size=vocab_size, seed=seed)
    config = GPTNeoXConfig(
        vocab_size=-(-len(tokenizer) // 8) * 8,  # round up like Pythia's padded vocab
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    # fork_rng: seed the init without disturbing the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(str(out), **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built tiny model %r (%d params) in %s", preset, n_params, out)
    return str(out)


def pretrain(model: Any, tokenizer: Any, preset: str, seed: int = 0,
             steps: int | None = None) -> list[float]:
    """Pre-trains `model` in place on `pretraining_corpus(seed)` (causal LM on every token).

    Plain torch in this process, on at most 2 threads: a one-time build, not a Ray job.
    Returns the loss of every step. Logs progress every ~5 s so a first run is never silent.
    """
    import random
    import time

    import torch

    from s2l_ray.demo.data import pretraining_corpus

    p = PRETRAIN[preset]
    steps = p["steps"] if steps is None else steps
    k, batch = p["statements"], p["batch"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = pretraining_corpus(seed, n=steps * batch * k)
    enc = tokenizer(texts)["input_ids"]
    # Sequences of k statements, each followed by eos (as documents are in a pre-training mix).
    seqs = [[eos] + [t for ids in enc[i:i + k] for t in [*ids, eos]]
            for i in range(0, len(enc), k)]
    random.Random(f"tiny-pre:{seed}:order").shuffle(seqs)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, threads)))
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * (steps - s) / steps))
    losses: list[float] = []
    model.train()
    t0 = last = time.time()
    try:
        for step in range(steps):
            chunk = seqs[step * batch:(step + 1) * batch]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (batch, width)
            mask = torch.zeros_like(ids)
            for row, x in enumerate(chunk):
                ids[row, :len(x)] = torch.as_tensor(x)
                mask[row, :len(x)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            now = time.time()
            if now - last >= 5 or step + 1 == steps:
                last = now
                eta = (now - t0) / (step + 1) * (steps - step - 1)
                logger.info("pre-training tiny-pre:%s: step %d/%d loss %.3f, %.0fs elapsed, "
                            "eta %.0fs", preset, step + 1, steps, losses[-1], now - t0, eta)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def build_pretrained_model(out_dir: str | os.PathLike, preset: str = "small", seed: int = 0,
                           steps: int | None = None) -> str:
    """Builds (or reuses) the `tiny-pre:<preset>` model in out_dir: the tiny:<preset> model with
    the same seed, pre-trained by `pretrain`. Returns str(out_dir)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if _is_complete(out) and (out / "pretraining.json").is_file():
        logger.info("reusing pre-trained tiny model in %s", out)
        return str(out)
    logger.info("building tiny-pre:%s once (a short pre-training on number facts, cached in "
                "%s)", preset, out.parent)
    build_tiny_model(out, preset=preset, seed=seed)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                 use_safetensors=True)
    with torch.random.fork_rng(devices=[]):  # seeded dropout-free training; caller RNG untouched
        torch.manual_seed(seed)
        losses = pretrain(model, tok, preset, seed=seed, steps=steps)
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(out), **kwargs)
    (out / "pretraining.json").write_text(json.dumps(
        {"preset": preset, "seed": seed, **PRETRAIN[preset], "steps": len(losses),
         "first_loss": losses[0] if losses else None,
         "last_loss": losses[-1] if losses else None}, indent=1) + "\n", encoding="utf-8")
    return str(out)


def default_cache_dir() -> Path:
    return Path(os.environ.get("S2L_RAY_CACHE", Path.home() / ".cache" / "s2l_ray")) / "models"


def parse_spec(spec: str) -> tuple[str, str] | None:
    """('tiny' or 'tiny-pre', preset) for an offline tiny spec; None for anything else."""
    for prefix in (PRETRAINED_PREFIX, TINY_PREFIX):
        if spec.startswith(prefix):
            return prefix[:-1], spec[len(prefix):]
    return None


def cache_name(family: str, preset: str) -> str:
    """The cache folder of `tiny:<preset>` (family "tiny") or `tiny-pre:<preset>` ("tiny-pre"):
    "tiny-pre-small-<digest>", the digest over everything that decides the weights (the recipe
    version, the preset's shape, its pre-training settings, and the start of the tokenizer's
    and the pre-training's corpora, whose streams change whenever the generator does)."""
    from s2l_ray.demo.data import pretraining_corpus, tokenizer_corpus

    pre = family == "tiny-pre"
    h = hashlib.sha256(json.dumps(
        {"version": RECIPE_VERSION, "shape": PRESETS[preset],
         "pretrain": PRETRAIN[preset] if pre else None}, sort_keys=True).encode())
    for text in tokenizer_corpus(0, 64) + (pretraining_corpus(0, 256) if pre else []):
        h.update(text.encode() + b"\0")
    return f"{family}-{preset}-{h.hexdigest()[:10]}"


def resolve_model(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """'tiny:<preset>' -> a built model directory under cache_dir; 'tiny-pre:<preset>' -> one
    under the shared cache (`default_cache_dir()`: it takes a pre-training, so it is built once
    per machine, not per run); anything else unchanged.

    The build goes into a temporary directory next to the target and is renamed into place, so
    concurrent callers (several Ray workers) never see a half-written model: the first rename
    wins and the others discard their identical copy.
    """
    parsed = parse_spec(spec)
    if parsed is None:
        return spec  # hub id or local path: transformers resolves it
    family, preset = parsed
    _check_preset(preset)
    if family == "tiny-pre":
        cache = default_cache_dir()
        name = cache_name(family, preset)

        def build(d: Path) -> None:
            build_pretrained_model(d, preset=preset)

        def ready(d: Path) -> bool:
            return _is_complete(d) and (d / "pretraining.json").is_file()
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        name = cache_name(family, preset)

        def build(d: Path) -> None:
            build_tiny_model(d, preset=preset)

        ready = _is_complete
    target = cache / name
    if ready(target):
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is meant to be shared
        if target.exists() and not ready(target):
            # Left over from a crash before atomic builds: move it aside, then remove it.
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{name}.", dir=cache))
            with contextlib.suppress(FileNotFoundError):  # another process moved it already
                os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not ready(target):  # not a lost race: a real error
                raise
            logger.info("another process built %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
