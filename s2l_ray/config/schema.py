"""Typed, self-checking configuration: one dataclass per stage, composed into `S2LConfig`.

Every field carries a docstring (the string literal under it); `field_docs` reads them back so the
CLI (`s2l config --reference`) and the README show the same text. Loading is strict: unknown keys
and wrong types fail before any work starts, with a message that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from s2l_ray.core.methods import SELECTION_METHODS, Method, budget_problem
from s2l_ray.errors import S2LError


class ConfigError(S2LError, ValueError):
    """A configuration problem. The message names the key and the fix."""


def _fail(key: str, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{short_text(key, 120)}': {problem}. Fix: {fix}")


def short(value: Any) -> str:
    """repr of a (bad) config value cut to a short prefix, computed without expanding all of
    it: an error message echoes what it got, never megabytes of it."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return short_text(r.repr(value), 120)


def short_text(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class RunConfig:
    """Where outputs go and how Ray is reached."""

    output_dir: str = "s2l_output"
    """Folder every stage writes into (one subfolder per stage); a rerun skips finished stages."""
    seed: int = 42
    """Master seed: shuffling, k-means initialisation and selection derive from it."""
    ray_address: str | None = None
    """Ray cluster to join: 'auto' joins the running one; null uses RAY_ADDRESS if set, else
    starts a local Ray on this machine."""
    num_cpus: int | None = None
    """CPUs for a local Ray (null: all of them). Ignored when joining a cluster."""
    overwrite: bool = False
    """Recompute stages whose stored config differs from this one, instead of failing."""
    storage_uri: str | None = None
    """Where finished stages are also kept: s3://bucket/prefix, gs://bucket/prefix, file:///path
    or an absolute path. Each stage works in output_dir, then uploads its result to
    <storage_uri>/<stage>/ (its _SUCCESS.json last); a run whose output_dir lacks a finished
    stage downloads it from there instead of recomputing it. Credentials come from the
    environment, never the URI. null: output_dir only."""
    progress_seconds: float = 15.0
    """Seconds between the progress lines a long stage logs (done/total, rate, time left);
    0 turns them off (each stage still logs its totals when it ends)."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            _fail("run.output_dir", "is empty", "give a folder, e.g. run.output_dir=out/s2l")
        if "://" in self.output_dir:
            # Stages write with local paths; a URI here would become a relative folder.
            _fail("run.output_dir", f"is the URI {short(self.output_dir)}", "give a local folder "
                  "(the stages' work space) and put the URI in run.storage_uri")
        # Absolute, because Ray Train workers and Ray Data actors run in other directories.
        self.output_dir = os.path.abspath(os.path.expanduser(self.output_dir))
        if self.progress_seconds < 0:
            _fail("run.progress_seconds", f"is {self.progress_seconds}",
                  "use seconds between progress lines (e.g. 15), or 0 to turn them off")
        if self.num_cpus is not None and self.num_cpus < 1:
            _fail("run.num_cpus", f"is {short(self.num_cpus)}", "use a positive count or null")
        if self.storage_uri is not None:
            self._check_storage_uri()

    def _check_storage_uri(self) -> None:
        from urllib.parse import parse_qsl, urlsplit

        from s2l_ray.redaction import REDACTED, SECRET_PARAM, redact

        uri = self.storage_uri or ""
        shown = short_text(redact(uri))  # what messages may echo: never a secret
        scheme, sep, rest = uri.partition("://")
        creds_fix = ("remove them from the URI and set them in the environment "
                     "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) "
                     "or use the cloud's default credentials")
        if sep and "@" in rest and scheme.lower() != "file":
            # s3://KEY:SECRET@bucket, also with a '/' in the secret (s3://KEY:a/b@bucket), would
            # land in config.yaml, logs and pyarrow's error messages.
            _fail("run.storage_uri", f"'{shown}' carries credentials (user info before '@')",
                  creds_fix + "; a prefix containing '@' is not supported")
        if sep:
            secret = [k for k, _ in parse_qsl(urlsplit(uri).query, keep_blank_values=True)
                      if SECRET_PARAM.search(k)]
            if secret:
                _fail("run.storage_uri", f"'{shown}' carries credentials (query parameter "
                      f"{', '.join(sorted(set(secret)))})", creds_fix)
        if not sep:  # a plain path: must not depend on the directory the job starts in
            local = os.path.expanduser(uri)
            if not os.path.isabs(local):
                _fail("run.storage_uri", f"'{shown}' is neither a URI nor an absolute path",
                      "use s3://bucket/prefix, gs://bucket/prefix, file:///abs/path or /abs/path")
            self.storage_uri = local = os.path.abspath(local)
        elif scheme.lower() not in ("s3", "gs", "file"):
            _fail("run.storage_uri", f"scheme '{short_text(scheme, 20)}' is not supported",
                  "use s3://bucket/prefix, gs://bucket/prefix, file:///abs/path or /abs/path")
        elif scheme.lower() == "file":
            if not os.path.isabs(rest):
                _fail("run.storage_uri", f"'{shown}' is not an absolute file URI",
                      "write file:///abs/path (three slashes)")
            local = os.path.abspath(rest)
        else:
            bucket = rest.split("/", 1)[0].split("?", 1)[0]
            if not bucket:
                _fail("run.storage_uri", f"'{shown}' names no bucket", f"write {scheme}://BUCKET/"
                      "prefix")
            if ":" in bucket:  # s3://KEY:SECRET/... : bucket names hold no ':'
                _fail("run.storage_uri", f"'{scheme}://{REDACTED}/...' carries credentials (a "
                      "':' in the bucket name, as in s3://KEY:SECRET/prefix)", creds_fix)
            self.storage_uri = uri.rstrip("/")
            return
        out = self.output_dir
        if os.path.commonpath([local, out]) in (local, out):  # an upload would copy onto itself
            _fail("run.storage_uri", f"'{shown}' overlaps run.output_dir '{short_text(out)}'",
                  "keep the storage apart from run.output_dir (neither inside the other)")


@dataclass
class DemoConfig:
    """The built-in `mathmix` data set, used when `data.source` is 'demo:mathmix'."""

    n_train: int = 2000
    """Training rows to generate."""
    n_test_per_source: int = 40
    """Held-out rows per kind of problem, for evaluation (the held-out set is scored per kind)."""
    seed: int = 0
    """Seed of the generator (the same seed gives the same rows)."""

    def __post_init__(self) -> None:
        if self.n_train < 1:
            _fail("demo.n_train", f"is {short(self.n_train)}", "use at least 1")
        if self.n_test_per_source < 0:
            _fail("demo.n_test_per_source", f"is {short(self.n_test_per_source)}", "use 0 or more")


@dataclass
class DataConfig:
    """Ingestion: where the instruction data comes from and how it becomes tokens."""

    source: str = "demo:mathmix"
    """Training data: a local JSON/JSONL/Parquet/CSV file or folder, 'hf:NAME' for a Hugging Face
    data set (hub name or a local dataset folder), or 'demo:mathmix' for the built-in demo."""
    split: str = "train"
    """Split to read from a Hugging Face data set."""
    eval_source: str | None = None
    """Held-out data for evaluation, same forms as `source` (null: the demo's test split for
    the demo, else none)."""
    format: Literal["auto", "mathinstruct", "alpaca", "chat"] = "auto"
    """Row format: mathinstruct (instruction, output), alpaca (instruction, input, output), chat
    (messages: list of {role, content}); auto detects it per row."""
    id_column: str | None = None
    """Column holding a stable example id; null derives the id from a hash of the normalised
    content."""
    source_column: str = "source"
    """Optional column naming each row's origin (kept for per-source reports); may be absent."""
    template: Literal["alpaca", "plain"] = "alpaca"
    """Prompt template: 'alpaca' (the S2L/MathInstruct prompt) or 'plain' (the instruction
    text only)."""
    max_length: int = 512
    """Longest example in tokens (prompt + response + end-of-text)."""
    max_row_bytes: int = 1 << 20
    """Largest input row in bytes (a JSON line, a JSON array item, a CSV record, or the text
    and binary values of a Parquet / Hugging Face row). Larger rows are rejected as
    `too_large` before they are parsed or tokenized, and no reader holds more than about this
    much of one row; the default (1 MiB) is far above what max_length tokens take."""
    overlong: Literal["truncate", "reject"] = "truncate"
    """Examples over max_length: 'truncate' cuts the response, 'reject' moves them to rejects."""
    tokenizer: str | None = None
    """Tokenizer used to tokenize (null: the reference model's)."""
    duplicates: Literal["reject", "error"] = "reject"
    """Rows whose id repeats one already seen: 'reject' keeps the first (by file and row) and
    moves the rest to rejects; 'error' fails the run if any id repeats."""
    allowed_roots: list[str] | None = None
    """Folders local input must come from: when set, data.source and data.eval_source (files,
    folders, every file in them and local 'hf:' folders, symlinks resolved) must lie inside one
    of them, checked before any work starts (null: any path; hub names are not paths)."""

    def __post_init__(self) -> None:
        if not self.source:
            _fail("data.source", "is empty", "give a path, 'hf:NAME' or 'demo:mathmix'")
        if self.max_length < 8:
            _fail("data.max_length", f"is {short(self.max_length)}",
                  "use at least 8 tokens (512 typical)")
        if self.max_row_bytes < 1024:
            _fail("data.max_row_bytes", f"is {short(self.max_row_bytes)}",
                  "use at least 1024 bytes (1048576, 1 MiB, is the default)")
        if self.allowed_roots is not None:
            if not self.allowed_roots or not all(self.allowed_roots):
                _fail("data.allowed_roots", f"is {short(self.allowed_roots)}",
                      "list at least one non-empty folder, or null to allow any path")
            # Absolute now, so the check cannot depend on the directory a worker starts in.
            self.allowed_roots = [os.path.abspath(os.path.expanduser(r))
                                  for r in self.allowed_roots]


@dataclass
class TrainConfig:
    """Fine-tuning with Ray Train + DeepSpeed (shared by the reference and the target model)."""

    model: str = "EleutherAI/pythia-70m-deduped"
    """Hugging Face hub id, local folder, 'tiny:<preset>' for an offline tiny model with random
    weights, or 'tiny-pre:<preset>' for that model after a short pre-training on number facts
    (built once into $S2L_RAY_CACHE, default ~/.cache/s2l_ray)."""
    trust_remote_code: bool = False
    """Allow the model's own Python code from the hub; off unless you trust the source."""
    epochs: int = 3
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null: run all epochs)."""
    train_steps: int | None = None
    """Fixed step budget: exactly this many optimizer steps whatever the data size, repeating
    epochs as needed, so that subsets of different sizes get equal compute (null: `epochs`
    passes, the paper's policy)."""
    lr: float = 2e-5
    """Peak learning rate (AdamW)."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming the learning rate up (cosine decay afterwards)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 4
    """Examples per worker per micro-batch."""
    grad_accum: int = 8
    """Micro-batches per optimizer step."""
    num_checkpoints: int = 10
    """Checkpoints (T) saved evenly over training; each becomes one point of a trajectory."""
    checkpoint_steps: list[int] | None = None
    """Explicit optimizer steps to checkpoint at (overrides num_checkpoints)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """'auto': bf16 on GPUs that support it, fp32 on CPU."""
    num_workers: int = 1
    """Ray Train workers (one process, and one GPU when use_gpu, each)."""
    use_gpu: bool | None = None
    """Train on GPUs; null decides from the cluster (GPUs present: yes)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    max_failures: int = 0
    """Worker-group failures to survive by restarting from the last checkpoint (-1: forever)."""

    def validate(self, key: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(f"{key}.zero_stage", f"is {short(self.zero_stage)}", "use 0, 1, 2 or 3")
        if self.num_workers < 1:
            _fail(f"{key}.num_workers", f"is {short(self.num_workers)}", "use 1 or more workers")
        for name in ("epochs", "batch_size", "grad_accum", "num_checkpoints"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"is {short(getattr(self, name))}", "use 1 or more")
        if self.max_steps is not None and self.max_steps < 1:
            _fail(f"{key}.max_steps", f"is {short(self.max_steps)}", "use 1 or more, or null")
        if self.train_steps is not None:
            if self.train_steps < 1:
                _fail(f"{key}.train_steps", f"is {short(self.train_steps)}",
                      "use 1 or more, or null")
            if self.max_steps is not None:
                _fail(f"{key}.train_steps", "is set together with max_steps",
                      f"set only one: {key}.train_steps (fixed budget) or {key}.max_steps (cap)")
        if not 0 < self.lr < 1:
            _fail(f"{key}.lr", f"is {short(self.lr)}", "use a learning rate in (0, 1), e.g. 2e-5")
        if not 0 <= self.warmup_ratio < 1:
            _fail(f"{key}.warmup_ratio", f"is {short(self.warmup_ratio)}", "use a value in [0, 1)")
        if self.checkpoint_steps is not None:
            steps = self.checkpoint_steps
            if not steps or any(s < 1 for s in steps) or sorted(set(steps)) != steps:
                _fail(f"{key}.checkpoint_steps", f"is {short(steps)}",
                      "list distinct positive steps in increasing order, or null")


@dataclass
class ReferenceConfig(TrainConfig):
    """The small reference model: trained here (the TrainConfig keys), or your own checkpoints."""

    checkpoints: list[str] | None = None
    """Your own reference checkpoints, scored in this order instead of training one (the other
    reference.* training keys are then unused): local model folders (saved with
    save_pretrained, safetensors weights) or hub ids with a revision, 'EleutherAI/pythia-70m@
    step1000'. Each must have the same tokenizer as the others and as the data, logits from
    its output head, and safetensors weights; checked before any scoring (null: train)."""

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.checkpoints is not None:
            specs = self.checkpoints
            if not specs or not all(isinstance(s, str) and s.strip() for s in specs):
                _fail(f"{key}.checkpoints", f"is {specs}", "list at least one model folder or "
                      "hub id@revision, or null to train the reference")
            if len(set(specs)) != len(specs):
                _fail(f"{key}.checkpoints", f"repeats a checkpoint ({specs})",
                      "list each checkpoint once: a repeat adds a copy of the same column")


@dataclass
class TrajectoryConfig:
    """Per-example loss under every reference checkpoint, computed by Ray Data actors."""

    batch_tokens: int | None = None
    """Tokens per batch (padded length x rows); batches are length-bucketed. null: 65536 on a
    GPU (1.1-1.3x the rate of 16384 on an H200, benchmarks/results/trajectory_throughput_gpu.md),
    16384 on CPU."""
    concurrency: int = 1
    """Model actors (each holds all checkpoints)."""
    use_gpu: bool | None = None
    """One GPU per actor; null decides from the cluster."""
    dtype: Literal["auto", "bf16", "bf16-weights", "fp32"] = "auto"
    """Compute dtype: 'bf16' autocasts float32 weights to bf16; 'bf16-weights' casts the
    weights themselves (no float32 residual stream: less memory traffic, 1.2x the rate on an
    H200); 'auto' is 'bf16-weights' on GPU and 'fp32' on CPU."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor; a CPU actor computes with that many threads (at least 1)."""
    source: str | None = None
    """Ready-made trajectories instead of scoring: a Parquet file or folder with columns `id`
    (the ingested ids) and `losses` (a list of T floats per example, in checkpoint order).
    Every ingested id must be there once and no other; the reference is then not trained
    (null: score with the reference checkpoints)."""
    scorer: Literal["padded", "packed"] = "packed"
    """'packed': sequences end to end, per-sequence (varlen) attention, no padding; 'padded':
    length-bucketed right-padded batches. Same losses; benchmarks/trajectory_throughput.py."""
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    """torch.compile mode for the packed scorer's model. 'default' compiles for any batch
    length (1.25x the eager rate at Pythia-160M on an H200, for ~25 s of compiling per actor:
    worth it from ~200k examples per actor); 'reduce-overhead' pads every batch to one shape
    for CUDA graphs."""

    def tokens_per_batch(self, use_gpu: bool) -> int:
        """batch_tokens, or the device's default where it is null."""
        return self.batch_tokens or (65536 if use_gpu else 16384)

    def __post_init__(self) -> None:
        if self.compile != "off" and self.scorer != "packed":
            _fail("trajectories.compile", f"is {self.compile!r} with scorer {self.scorer!r}",
                  "set trajectories.scorer=packed or trajectories.compile=off")
        if self.batch_tokens is not None and self.batch_tokens < 64:
            _fail("trajectories.batch_tokens", f"is {short(self.batch_tokens)}",
                  "use 64 or more, or null for the device's default")
        if self.concurrency < 1:
            _fail("trajectories.concurrency", f"is {short(self.concurrency)}",
                  "use 1 or more actors")
        if not self.cpus_per_actor > 0:
            _fail("trajectories.cpus_per_actor", f"is {short(self.cpus_per_actor)}",
                  "use a positive number of CPUs, e.g. 1 (0.5 on a 2-core laptop)")


@dataclass
class ClusterConfig:
    """Distributed faiss k-means over the trajectories."""

    k: int = 100
    """Number of clusters."""
    max_iter: int = 20
    """Lloyd iterations at most."""
    tol: float = 1e-4
    """Stop when the relative objective improvement falls below this."""
    normalize: Literal["none", "standardize"] = "none"
    """'none' clusters raw losses; 'standardize' uses per-example z-scored trajectories."""
    num_workers: int = 2
    """Actors holding shards of the trajectories."""
    init: Literal["kmeans++", "random"] = "kmeans++"
    """Initial centroids, drawn from a sample of the examples picked by a hash of (run.seed, id):
    'kmeans++' (D² sampling) or 'random' (k rows of the sample). Lloyd iterations then use every
    example, not a sample."""
    init_sample_per_centroid: int = 64
    """Size of the initialisation sample, per centroid (capped at the number of examples)."""
    cpus_per_worker: float | None = None
    """CPUs reserved per shard actor (null: the cluster's CPUs shared among num_workers, at most
    1 each); faiss uses that many threads."""
    use_gpu: bool | None = None
    """One GPU per shard actor for the faiss index (needs faiss built with GPU support); null:
    yes when the cluster has GPUs and this faiss has GPU support."""
    per_source: bool = False
    """Fit k-means separately within each value of the source column (min(k, rows) clusters per
    source; rows without a source form their own group), and let the select stage split the
    budget over the sources first, smallest first, then over each source's clusters: the
    official code's rule (schedules/s2l.py). False: one k-means over all rows (the paper's
    Algorithm 1 as written)."""
    train_sample_per_centroid: int | None = None
    """Lloyd iterations on at most this many rows per centroid (per source with per_source),
    picked by a hash of (run.seed, id); every row is then labelled. null: fit on all rows. The
    official code (faiss.Kmeans defaults) uses 256."""
    nan_losses: Literal["error", "zero"] = "error"
    """A NaN loss (a prompt longer than the maximum leaves no response token): 'error' stops
    with the ids; 'zero' sets it to 0, as the official code does."""

    def __post_init__(self) -> None:
        if self.train_sample_per_centroid is not None and self.train_sample_per_centroid < 1:
            _fail("cluster.train_sample_per_centroid", f"is {self.train_sample_per_centroid}",
                  "use null (all rows) or a count such as the official 256")
        if self.k < 1:
            _fail("cluster.k", f"is {short(self.k)}", "use 1 or more clusters (100 typical)")
        if self.max_iter < 1:
            _fail("cluster.max_iter", f"is {short(self.max_iter)}", "use 1 or more")
        if self.num_workers < 1:
            _fail("cluster.num_workers", f"is {short(self.num_workers)}", "use 1 or more")
        if not self.tol >= 0:
            _fail("cluster.tol", f"is {short(self.tol)}", "use 0 (run all max_iter) or a small "
                  "positive relative improvement such as 1e-4")
        if self.init_sample_per_centroid < 1:
            _fail("cluster.init_sample_per_centroid", f"is {short(self.init_sample_per_centroid)}",
                  "use 1 or more (64 typical)")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            _fail("cluster.cpus_per_worker", f"is {short(self.cpus_per_worker)}",
                  "use a positive number of CPUs, or null")


# The settings that reproduce the official code (BigML-CS-UCLA/S2L, schedules/s2l.py): faiss.Kmeans
# (T, 100, niter=20) with faiss's defaults (random initial points, every iteration run, at most 256
# training points per centroid) within each source, raw losses with NaN set to 0, clusters of <= 2
# rows held back. The README's "Official rules" paragraph explains each.
OFFICIAL_S2L = ("cluster.k=100", "cluster.per_source=true", "cluster.max_iter=20", "cluster.tol=0",
                "cluster.init=random", "cluster.train_sample_per_centroid=256",
                "cluster.normalize=none", "cluster.nan_losses=zero",
                "select.tiny_cluster_size=2", "select.noise_cap=false")
# Sweep-only names: S2L with select.noise_cap forced on / off, to measure the cap in one sweep
SWEEP_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "s2l_cap": ("s2l", {"noise_cap": True}), "s2l_nocap": ("s2l", {"noise_cap": False})}


@dataclass
class SelectConfig:
    """Spending the budget."""

    method: Method = "s2l"
    """Selection method: S2L, or a baseline to compare with. 'source_balanced' is S2L's
    per-source budget split (evenly over sources, smallest first, a small source taken whole)
    with uniform sampling inside each source: the control that shows what trajectories add."""
    budget: int | float = 0.1
    """Examples to select: an integer count, or a float fraction in (0, 1] of the valid data."""
    early_fraction: float = 0.2
    """el2n: an example's score is its mean loss over the first ceil(early_fraction x T)
    checkpoints."""
    tiny_cluster_size: int = 0
    """s2l: clusters of at most this many rows are held back (pooled per source) and drawn from
    only for the budget the other clusters cannot take. The official code uses 2; 0 (default)
    treats every cluster alike, as the paper's Algorithm 1."""
    noise_cap: bool = False
    """s2l: cap clusters whose loss does not fall (relative to the data, see
    noise_drop_ratio) at their base-rate share floor(B x size / N), what uniform sampling would
    give them; their unused share flows to the other clusters. Guards against S2L spending the
    budget on small clusters of unlearnable (e.g. wrong-answer) rows."""
    noise_drop_ratio: float = 0.5
    """s2l with noise_cap: a cluster is noise when its mean loss ends above the data's and its
    relative drop (1 - last/first checkpoint mean loss) is below this fraction of the data's."""

    def __post_init__(self) -> None:
        check_budget(self.budget, "select.budget")
        if isinstance(self.tiny_cluster_size, bool) or self.tiny_cluster_size < 0:
            _fail("select.tiny_cluster_size", f"is {self.tiny_cluster_size}",
                  "use 0 (off) or the official code's 2")
        if not 0 <= self.noise_drop_ratio <= 1:
            _fail("select.noise_drop_ratio", f"is {self.noise_drop_ratio}",
                  "use a fraction in [0, 1], e.g. 0.5")
        if not 0 < self.early_fraction <= 1:
            _fail("select.early_fraction", f"is {short(self.early_fraction)}",
                  "use a fraction in (0, 1], e.g. 0.2")


def check_budget(budget: int | float, key: str) -> None:
    bad = budget_problem(budget)
    if bad:
        _fail(key, *bad)


@dataclass
class SweepConfig:
    """Ray Tune grid over selection methods x budgets x seeds, fine-tuning the target each time."""

    methods: list[str] = field(default_factory=lambda: ["s2l", "random"])
    """Selection methods to compare: any select.method, or 's2l_cap' / 's2l_nocap' (S2L with
    select.noise_cap on / off, the rest of select.* as configured)."""
    budgets: list[int | float] = field(default_factory=lambda: [0.1, 0.3])
    """Budgets to compare (counts or fractions); 1.0 (or the data size) is the full data, run
    once per seed whatever the methods."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds per cell: each one seeds both the selection and the target's training."""
    max_concurrent_trials: int = 1
    """Trials run at once (each one is a whole Ray Train run of target.num_workers workers)."""
    keep_models: bool = True
    """Keep each trial's fine-tuned target (Hugging Face format, in sweep/trials/<trial>/model);
    false deletes it once evaluated, for large targets and many trials."""
    max_failures: int = 0
    """Times Tune retries a failed trial (its fine-tune resumes from its last checkpoint)."""

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in SELECTION_METHODS and m not in SWEEP_VARIANTS:
                _fail("sweep.methods", f"has unknown method {short(m)}",
                      f"choose from {', '.join((*SELECTION_METHODS, *SWEEP_VARIANTS))}")
        for b in self.budgets:
            check_budget(b, "sweep.budgets")
        if not self.methods or not self.budgets or not self.seeds:
            _fail("sweep", "methods, budgets and seeds must be non-empty", "list at least one")
        for name in ("methods", "budgets", "seeds"):
            values = getattr(self, name)
            if len(set(map(repr, values))) != len(values):
                _fail(f"sweep.{name}", f"repeats a value ({short(values)})", "list each value once")
        if self.max_concurrent_trials < 1:
            _fail("sweep.max_concurrent_trials", f"is {short(self.max_concurrent_trials)}",
                  "use 1 or more")


@dataclass
class EvalConfig:
    """Evaluation of each fine-tuned target on held-out data (`data.eval_source`)."""

    generate: bool = True
    """Greedy-generate an answer per example and score exact match of the final answer ("The
    answer is X"), per source and macro-averaged; false scores loss/perplexity only."""
    max_new_tokens: int = 96
    """Longest generation, in tokens."""
    batch_size: int = 32
    """Prompts generated together (left-padded)."""
    batch_tokens: int = 16384
    """Padded tokens per batch when scoring the held-out loss."""
    max_examples: int | None = None
    """Evaluate at most this many held-out examples (the first by id; null: all)."""
    split: str = "test"
    """Split to read when data.eval_source is a Hugging Face data set."""
    use_gpu: bool | None = None
    """Evaluate on a GPU; null decides from the cluster."""
    cpus: float = 1.0
    """CPUs reserved by the evaluation task (and torch threads on CPU)."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"eval.{name}", f"is {short(getattr(self, name))}", "use 1 or more")
        if self.batch_tokens < 64:
            _fail("eval.batch_tokens", f"is {short(self.batch_tokens)}", "use 64 or more")
        if self.max_examples is not None and self.max_examples < 1:
            _fail("eval.max_examples", f"is {short(self.max_examples)}", "use 1 or more, or null")
        if not self.cpus > 0:
            _fail("eval.cpus", f"is {short(self.cpus)}", "use a positive number of CPUs, e.g. 1")


def _default_target() -> TrainConfig:
    return TrainConfig(model="EleutherAI/pythia-410m", num_checkpoints=1, lr=2e-5)


@dataclass
class S2LConfig:
    """The whole pipeline: one section per stage."""

    run: RunConfig = field(default_factory=RunConfig)
    """Outputs and Ray."""
    demo: DemoConfig = field(default_factory=DemoConfig)
    """Built-in demo data set."""
    data: DataConfig = field(default_factory=DataConfig)
    """Ingestion and tokenization."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Small reference model training (stage train-ref)."""
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    """Loss trajectories (stage trajectories)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """k-means over trajectories (stage cluster)."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Budgeted selection (stage select)."""
    target: TrainConfig = field(default_factory=_default_target)
    """Target model fine-tuning on the selection."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Budget/method sweeps with Ray Tune."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of each fine-tuned target."""

    def __post_init__(self) -> None:
        self.reference.validate("reference")
        self.target.validate("target")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections: a stage is stale when the sections it reads change."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
