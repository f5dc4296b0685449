"""`s2l`: a thin command line over the stages. Everything it can set lives in the typed config."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from s2l_ray import __version__
from s2l_ray.api import PACKAGED, config_path
from s2l_ray.config import ConfigError, S2LConfig, dump_config, reference_table
from s2l_ray.errors import S2LError

log = logging.getLogger("s2l_ray.cli")
# The CLI is a thin layer over s2l_ray.api (load, run_pipeline, report): the same functions a
# notebook calls.
__all__ = ["PACKAGED", "build_parser", "config_path", "main"]

DESCRIPTION = """\
s2l: pick the training examples worth fine-tuning a large language model on.

S2L (SmallToLarge, NeurIPS 2024) trains a SMALL reference model on all of your instruction data,
records every example's loss at each checkpoint (its loss trajectory), clusters the trajectories,
and spends your budget evenly across the clusters. The LARGE target model is then fine-tuned on
that subset. Every stage runs on Ray (a local one, or your cluster) and writes its result to
<run.output_dir>/<stage>/; a rerun skips stages that are already done.
"""


def _epilog() -> str:
    from s2l_ray.stages.registry import STAGES

    lines = ["the pipeline, in order:"]
    for s in STAGES:
        lines.append(f"  {s.name:<13} {s.summary}\n  {'':<13} -> {s.output}")
    lines += [
        "",
        "configuration: a YAML file (see s2l_ray/configs/) plus key=value overrides; unknown keys",
        "and wrong types are rejected before any work starts. `s2l config --reference` lists",
        "every key with its default and meaning.",
        "",
        "examples:",
        "  s2l demo                                     # built-in data + tiny models, local Ray",
        "  s2l demo demo.n_train=500 run.output_dir=/tmp/s2l",
        "  s2l run mathinstruct select.budget=0.11       # a packaged config, by name",
        "  s2l ingest my.yaml data.source=data/train.jsonl data.overlong=reject",
        "  s2l select my.yaml budget=5000 method=random  # a stage's own keys need no prefix",
        "  s2l sweep my.yaml methods=[s2l,random] budgets=[0.1,0.3] seeds=[0,1,2]",
        "  s2l report s2l_output/demo                   # PNG plots of a finished run",
        "  s2l config my.yaml                           # print the resolved config",
        "  ray job submit --working-dir . -- s2l run my.yaml run.ray_address=auto",
    ]
    return "\n".join(lines)


def _scoped(command: str, overrides: list[str]) -> list[str]:
    """A stage command's bare `key=value` overrides belong to its own section (StageSpec.bare):
    `s2l select CFG budget=0.2` is select.budget=0.2."""
    from s2l_ray.stages.registry import BY_NAME

    if command not in BY_NAME:
        return list(overrides)
    section = BY_NAME[command].bare
    return [o if "." in o.partition("=")[0] else f"{section}.{o}" for o in overrides]


def _load(args: argparse.Namespace) -> S2LConfig:
    from s2l_ray import api

    return api.load(getattr(args, "config", None), _scoped(args.command, args.overrides))


def _add_config_args(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    if config:
        p.add_argument("config", help="pipeline YAML, or a packaged config name (demo, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. select.budget=0.2 reference.epochs=1; "
                   "a stage command also takes its own section's keys bare (budget=0.2)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")


def build_parser() -> argparse.ArgumentParser:
    from s2l_ray.stages.registry import STAGES

    parser = argparse.ArgumentParser(
        prog="s2l", description=DESCRIPTION, epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"s2l_ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in demo (local Ray)",
                       description="Built-in mathmix data + offline tiny models, end to end, on "
                       "a local Ray. Takes key=value overrides of the packaged demo config.")
    _add_config_args(p, config=False)
    p = sub.add_parser("run", help="run every stage of a pipeline config, skipping done ones")
    _add_config_args(p)
    for s in STAGES:
        p = sub.add_parser(s.name, help=s.summary, description=f"{s.summary}. Output: {s.output}")
        _add_config_args(p)
    p = sub.add_parser("report", help="a run's report: RUN_DIR/report/index.html (one "
                       "page: stages, sweep table, plots, cluster browser) and PNG plots",
                       description="Plot what a run's published stages hold, as PNG files in "
                       "RUN_DIR/report/, with an index.md, and write RUN_DIR/report/index.html: "
                       "one self-contained page (opens from disk) with the run at a glance, the "
                       "sweep table, the plots and a cluster browser. Needs no Ray.")
    p.add_argument("run_dir", help="a run's output folder (its run.output_dir)")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="examples shown per cluster in index.html, nearest the centroid first "
                   "(default 3)")
    p.add_argument("--log-level", default="INFO")
    p = sub.add_parser("config", help="print the resolved config, or --reference for all keys")
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    p.add_argument("--reference", action="store_true",
                   help="print every key, type, default and meaning as a markdown table")
    p.add_argument("--log-level", default="WARNING")
    p = sub.add_parser("make-demo-data", help="write the mathmix demo data set as JSONL")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test-per-source", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    p = sub.add_parser("make-tiny-model", help="save an offline tiny Pythia-shaped model + "
                       "tokenizer that loads with from_pretrained")
    p.add_argument("out_dir")
    p.add_argument("--preset", default="micro")
    p.add_argument("--pretrained", action="store_true",
                   help="pre-train it briefly on number facts (what 'tiny-pre:<preset>' is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    from s2l_ray.runtime import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except S2LError as e:  # user-caused: one message that says what to do, no traceback
        log.error("%s", user_message(e))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume from the last finished stage")
        return 130
    except Exception:
        # Through logging, not Python's own traceback printer: the traceback is redacted
        # (secret values, URI credentials) like every other line s2l prints.
        log.exception("s2l %s failed", args.command)
        return 1


def user_message(e: S2LError) -> str:
    """The error's own message, also when Ray wrapped it (raised in a task or an actor)."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, S2LError) else e)


def _dispatch(args: argparse.Namespace) -> int:
    from s2l_ray import api
    from s2l_ray.redaction import redact

    if args.command == "config":
        if args.reference:
            sys.stdout.write(reference_table() + "\n")
            return 0
        rest = list(args.args)
        name = rest.pop(0) if rest and "=" not in rest[0] else None
        sys.stdout.write(redact(dump_config(api.load(name, rest))))
        return 0
    if args.command == "make-demo-data":
        from s2l_ray.demo.data import write_mathmix

        paths = write_mathmix(args.out_dir, n_train=args.n_train,
                              n_test_per_source=args.n_test_per_source, seed=args.seed)
        log.info("wrote %s", ", ".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    if args.command == "make-tiny-model":
        from s2l_ray.models.tiny import PRESETS, build_pretrained_model, build_tiny_model

        if args.preset not in PRESETS:
            raise ConfigError(f"--preset '{args.preset}' is unknown. Fix: use one of "
                              f"{', '.join(PRESETS)}")
        build = build_pretrained_model if args.pretrained else build_tiny_model
        log.info("saved %s", build(args.out_dir, preset=args.preset, seed=args.seed))
        return 0
    if args.command == "report":
        api.report(args.run_dir, examples_per_cluster=args.examples)
        return 0
    cfg = api.load("demo", args.overrides) if args.command == "demo" else _load(args)
    if args.command in ("demo", "run"):
        api.run_pipeline(cfg)  # writes the report after a sweep
        if args.command == "demo":
            _print_result(Path(cfg.run.output_dir))
    else:
        api.run_pipeline(cfg, until=args.command)
        if args.command == "sweep":  # the pictures of a finished sweep: cheap and current
            api.report(cfg.run.output_dir)
    return 0


def _print_result(run_dir: Path) -> None:
    """The demo's last words: its result table and the sentence that reads it (stdout)."""
    summary = run_dir / "sweep" / "summary.md"
    if summary.is_file():
        head = summary.read_text().split("\n## All metrics", 1)[0]
        sys.stdout.write("\n" + head.rstrip() + "\n\n"
                         "The run's report (open it in a browser): "
                         f"{run_dir / 'report' / 'index.html'}\n")
