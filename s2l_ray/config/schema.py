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
    raise ConfigError(f"config key '{key}': {problem}. Fix: {fix}")


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

    def __post_init__(self) -> None:
        if not self.output_dir:
            _fail("run.output_dir", "is empty", "give a folder, e.g. run.output_dir=out/s2l")
        if "://" in self.output_dir:
            # Stages write with local paths; a URI here would become a relative folder.
            _fail("run.output_dir", f"is the URI '{self.output_dir}'", "give a local folder "
                  "(the stages' work space) and put the URI in run.storage_uri")
        # Absolute, because Ray Train workers and Ray Data actors run in other directories.
        self.output_dir = os.path.abspath(os.path.expanduser(self.output_dir))
        if self.num_cpus is not None and self.num_cpus < 1:
            _fail("run.num_cpus", f"is {self.num_cpus}", "use a positive count or null")
        if self.storage_uri is not None:
            self._check_storage_uri()

    def _check_storage_uri(self) -> None:
        uri = self.storage_uri or ""
        scheme, sep, rest = uri.partition("://")
        if not sep:  # a plain path: must not depend on the directory the job starts in
            local = os.path.expanduser(uri)
            if not os.path.isabs(local):
                _fail("run.storage_uri", f"'{uri}' is neither a URI nor an absolute path",
                      "use s3://bucket/prefix, gs://bucket/prefix, file:///abs/path or /abs/path")
            self.storage_uri = local = os.path.abspath(local)
        elif scheme.lower() not in ("s3", "gs", "file"):
            _fail("run.storage_uri", f"scheme '{scheme}' is not supported",
                  "use s3://bucket/prefix, gs://bucket/prefix, file:///abs/path or /abs/path")
        elif scheme.lower() == "file":
            if not os.path.isabs(rest):
                _fail("run.storage_uri", f"'{uri}' is not an absolute file URI",
                      "write file:///abs/path (three slashes)")
            local = os.path.abspath(rest)
        else:
            bucket = rest.split("/", 1)[0]
            if not bucket:
                _fail("run.storage_uri", f"'{uri}' names no bucket", f"write {scheme}://BUCKET/"
                      "prefix")
            if "@" in bucket:  # s3://KEY:SECRET@bucket would land in config.yaml and logs
                _fail("run.storage_uri", "carries credentials", "remove them from the URI and "
                      "set them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                      "GOOGLE_APPLICATION_CREDENTIALS) or the cloud's default credentials")
            self.storage_uri = uri.rstrip("/")
            return
        out = self.output_dir
        if os.path.commonpath([local, out]) in (local, out):  # an upload would copy onto itself
            _fail("run.storage_uri", f"'{uri}' overlaps run.output_dir '{out}'",
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
            _fail("demo.n_train", f"is {self.n_train}", "use at least 1")
        if self.n_test_per_source < 0:
            _fail("demo.n_test_per_source", f"is {self.n_test_per_source}", "use 0 or more")


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
            _fail("data.max_length", f"is {self.max_length}", "use at least 8 tokens (512 typical)")
        if self.allowed_roots is not None:
            if not self.allowed_roots or not all(self.allowed_roots):
                _fail("data.allowed_roots", f"is {self.allowed_roots}",
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
            _fail(f"{key}.zero_stage", f"is {self.zero_stage}", "use 0, 1, 2 or 3")
        if self.num_workers < 1:
            _fail(f"{key}.num_workers", f"is {self.num_workers}", "use 1 or more workers")
        for name in ("epochs", "batch_size", "grad_accum", "num_checkpoints"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"is {getattr(self, name)}", "use 1 or more")
        if self.max_steps is not None and self.max_steps < 1:
            _fail(f"{key}.max_steps", f"is {self.max_steps}", "use 1 or more, or null")
        if self.train_steps is not None:
            if self.train_steps < 1:
                _fail(f"{key}.train_steps", f"is {self.train_steps}", "use 1 or more, or null")
            if self.max_steps is not None:
                _fail(f"{key}.train_steps", "is set together with max_steps",
                      f"set only one: {key}.train_steps (fixed budget) or {key}.max_steps (cap)")
        if not 0 < self.lr < 1:
            _fail(f"{key}.lr", f"is {self.lr}", "use a learning rate in (0, 1), e.g. 2e-5")
        if not 0 <= self.warmup_ratio < 1:
            _fail(f"{key}.warmup_ratio", f"is {self.warmup_ratio}", "use a value in [0, 1)")
        if self.checkpoint_steps is not None:
            steps = self.checkpoint_steps
            if not steps or any(s < 1 for s in steps) or sorted(set(steps)) != steps:
                _fail(f"{key}.checkpoint_steps", f"is {steps}",
                      "list distinct positive steps in increasing order, or null")


@dataclass
class TrajectoryConfig:
    """Per-example loss under every reference checkpoint, computed by Ray Data actors."""

    batch_tokens: int = 16384
    """Tokens per batch (padded length x rows); batches are length-bucketed."""
    concurrency: int = 1
    """Model actors (each holds all checkpoints)."""
    use_gpu: bool | None = None
    """One GPU per actor; null decides from the cluster."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: 'auto' is bf16 autocast on GPU and fp32 on CPU."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor; a CPU actor computes with that many threads (at least 1)."""

    def __post_init__(self) -> None:
        if self.batch_tokens < 64:
            _fail("trajectories.batch_tokens", f"is {self.batch_tokens}", "use 64 or more")
        if self.concurrency < 1:
            _fail("trajectories.concurrency", f"is {self.concurrency}", "use 1 or more actors")
        if not self.cpus_per_actor > 0:
            _fail("trajectories.cpus_per_actor", f"is {self.cpus_per_actor}",
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

    def __post_init__(self) -> None:
        if self.k < 1:
            _fail("cluster.k", f"is {self.k}", "use 1 or more clusters (100 typical)")
        if self.max_iter < 1:
            _fail("cluster.max_iter", f"is {self.max_iter}", "use 1 or more")
        if self.num_workers < 1:
            _fail("cluster.num_workers", f"is {self.num_workers}", "use 1 or more")
        if not self.tol >= 0:
            _fail("cluster.tol", f"is {self.tol}", "use 0 (run all max_iter) or a small positive "
                  "relative improvement such as 1e-4")
        if self.init_sample_per_centroid < 1:
            _fail("cluster.init_sample_per_centroid", f"is {self.init_sample_per_centroid}",
                  "use 1 or more (64 typical)")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            _fail("cluster.cpus_per_worker", f"is {self.cpus_per_worker}",
                  "use a positive number of CPUs, or null")




@dataclass
class SelectConfig:
    """Spending the budget."""

    method: Method = "s2l"
    """Selection method: S2L, or a baseline to compare with."""
    budget: int | float = 0.1
    """Examples to select: an integer count, or a float fraction in (0, 1] of the valid data."""
    early_fraction: float = 0.2
    """el2n: an example's score is its mean loss over the first ceil(early_fraction x T)
    checkpoints."""

    def __post_init__(self) -> None:
        check_budget(self.budget, "select.budget")
        if not 0 < self.early_fraction <= 1:
            _fail("select.early_fraction", f"is {self.early_fraction}",
                  "use a fraction in (0, 1], e.g. 0.2")


def check_budget(budget: int | float, key: str) -> None:
    bad = budget_problem(budget)
    if bad:
        _fail(key, *bad)


@dataclass
class SweepConfig:
    """Ray Tune grid over selection methods x budgets x seeds, fine-tuning the target each time."""

    methods: list[str] = field(default_factory=lambda: ["s2l", "random"])
    """Selection methods to compare."""
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
            if m not in SELECTION_METHODS:
                _fail("sweep.methods", f"has unknown method '{m}'",
                      f"choose from {', '.join(SELECTION_METHODS)}")
        for b in self.budgets:
            check_budget(b, "sweep.budgets")
        if not self.methods or not self.budgets or not self.seeds:
            _fail("sweep", "methods, budgets and seeds must be non-empty", "list at least one")
        for name in ("methods", "budgets", "seeds"):
            values = getattr(self, name)
            if len(set(map(repr, values))) != len(values):
                _fail(f"sweep.{name}", f"repeats a value ({values})", "list each value once")
        if self.max_concurrent_trials < 1:
            _fail("sweep.max_concurrent_trials", f"is {self.max_concurrent_trials}",
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
                _fail(f"eval.{name}", f"is {getattr(self, name)}", "use 1 or more")
        if self.batch_tokens < 64:
            _fail("eval.batch_tokens", f"is {self.batch_tokens}", "use 64 or more")
        if self.max_examples is not None and self.max_examples < 1:
            _fail("eval.max_examples", f"is {self.max_examples}", "use 1 or more, or null")
        if not self.cpus > 0:
            _fail("eval.cpus", f"is {self.cpus}", "use a positive number of CPUs, e.g. 1")


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
    reference: TrainConfig = field(default_factory=TrainConfig)
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
