"""The `autolayer` command. The only place that turns exceptions into messages and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from autolayer.cli_flags import add_config_flags, add_tracking_aliases, alias, config_overrides
from autolayer.config import (
    Config,
    PrunerName,
    SearchConfig,
    field_help,
    load_config,
    override,
    require_one_device,
)

EXIT_USER_ERROR = 2
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"

Handler = Callable[[argparse.Namespace], int]


def console() -> Any:
    """A rich console, 120 columns wide when output is not a terminal (logs, CI): whole tables."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120, log_path=False)


def _help(cls: type, name: str) -> str:
    return field_help(cls)[name]


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", metavar="URL", help=_help(SearchConfig, "storage"))
    add_root_option(parser)


def add_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        default="mlruns",
        help="Directory of the embedded stores (Optuna journal, MLflow SQLite, "
        "artifacts, caches). Default: mlruns",
    )


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    for flag, key, metavar in (
        ("--space", "search.space", "SPACE"),
        ("--n-trials", "search.n_trials", "N"),
        ("--timeout", "search.timeout", "SECONDS"),
        ("--max-total-steps", "search.max_total_steps", "N"),
        ("--study-name", "search.study_name", "NAME"),
        ("--sampler", "search.sampler", "{auto,grid,tpe,gp,random}"),
        ("--pruner", "search.pruner", "{" + ",".join(get_args(PrunerName)) + "}"),
        ("--seeds", "search.seeds", "N"),
        ("--device", "proxy.device", "DEVICE"),
        ("--threads", "proxy.threads", "N"),
        ("--storage", "search.storage", "URL"),
    ):
        alias(parser, flag, key, metavar)
    alias(
        parser,
        "--no-baselines",
        "search.baselines",
        const="false",
        help="Do not measure the free heuristics' picks after the search.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="Seed of the sampler and of every proxy run (repeats add 1, 2, ...); sets "
        "search.seed and proxy.seed.",
    )
    add_root_option(parser)
    add_tracking_aliases(parser)
    add_config_flags(parser)


def apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    """Command-line options win over the YAML file; the result is validated as a file is."""
    config = config_overrides(config, args)
    if getattr(args, "seed", None) is not None:
        config = override(config, {"search.seed": str(args.seed), "proxy.seed": str(args.seed)})
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autolayer",
        description="Find which transformer layers to train during RL post-training of an LLM, "
        "then train them. Each search trial is a short GRPO run that trains only the "
        "candidate layers and is scored on held-out verifiable rewards.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (_layers_parser, _search_parser, _demo_parser, _results_parser, _config_parser):
        register(sub)
    from autolayer.cli_analyze import register_analyze_commands
    from autolayer.cli_train import register_train_commands

    register_train_commands(sub)
    register_analyze_commands(sub)
    return parser


# --- layers ------------------------------------------------------------------------------------


def _layers_parser(sub: Any) -> None:
    p = sub.add_parser(
        "layers",
        help="List a model's decoder layers and parameter counts.",
        description="Print each decoder layer's index, module path and parameter "
        "count, the frozen rest, and mark the middle third (where "
        "RL-heavy layers usually sit). Reads only the model's config (the model is built on "
        "PyTorch's meta device): no weights, no tokenizer, seconds even for a 70B model.",
    )
    p.add_argument(
        "model",
        help="HF hub id, local path, or a bundled model (organism, code_organism, agent_organism).",
    )
    p.add_argument("--revision", help="Hub revision to pin.")
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.set_defaults(handler=cmd_layers)


def cmd_layers(args: argparse.Namespace) -> int:
    from autolayer.models import describe_layers, find_layer_stack, model_skeleton

    model = model_skeleton(args.model, revision=args.revision)  # no weights, no tokenizer
    infos, rest = describe_layers(model)
    path = find_layer_stack(model).path
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "stack_path": path,
                    "frozen_rest_params": rest,
                    "layers": [vars(i) for i in infos],
                },
                indent=2,
            )
        )
        return 0
    from rich.table import Table

    table = Table(
        title=f"{args.model}: {len(infos)} decoder layers at {path}", title_justify="left"
    )
    for column in ("layer", "module", "params", ""):
        table.add_column(column, justify="right" if column in ("layer", "params") else "left")
    for info in infos:
        table.add_row(
            str(info.index),
            info.path,
            f"{info.num_params:,}",
            "middle third" if info.middle_third else "",
        )
    table.add_row("-", "everything else (frozen)", f"{rest:,}", "embeddings, final norm, LM head")
    console().print(table)
    return 0


# --- search / demo -----------------------------------------------------------------------------


def _search_parser(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="Run (or resume) a layer search.",
        description="Run an Optuna study over layer subsets. Rerunning the same "
        "command resumes the study by name and never repeats a "
        "finished trial.",
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE.yaml",
        help="YAML config with model, task, proxy, search and tracking sections.",
    )
    _add_search_options(p)
    p.set_defaults(handler=cmd_search)


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="A real single-layer search on the bundled model (~1 min on 2 CPU cores).",
        description="Search the bundled tiny model's layers with its arithmetic "
        "task and the single-layer space, then print the table and "
        "the commands that open MLflow and optuna-dashboard.",
    )
    _add_search_options(p)
    p.set_defaults(handler=cmd_demo)


def _run_search(config: Config, root: Path) -> int:
    from autolayer.layers import layer_count_from_config
    from autolayer.spaces import bind, load_space
    from autolayer.storage import check_storage
    from autolayer.tracking import check_tracking

    # Fail on a bad space, layer range, storage or tracking URI in seconds, before the model
    # loads; nothing is written until the search has checked its data and model too.
    require_one_device(config.proxy)
    space = load_space(config.search.space)
    num_layers = layer_count_from_config(config.model.name)
    if num_layers is not None:
        bind(space, num_layers)
    check_storage(config.search.storage, root)
    check_tracking(config.tracking.enabled, config.tracking.tracking_uri)
    quiet_libraries()  # the model libraries load from here on

    from autolayer.progress import SearchDisplay
    from autolayer.report import study_dir
    from autolayer.runner import run_search

    out = console()
    with SearchDisplay(out, config) as display:
        ctx = run_search(config, root, display.hooks())
    print_results(out, ctx.study, trials=False)
    plots = study_dir(root, ctx.study.study_name)
    out.print(f"plots: {plots / 'contribution.png'}, {plots / 'history.png'}")
    storage = config.search.storage or f"{root}/optuna/journal.log"
    out.print("\nbrowse the results:")
    for line in _mlflow_lines(config, root, ctx.tracker.runs_url()):
        out.print(line, highlight=False, soft_wrap=True)
    journal = storage.removeprefix("journal:")
    dashboard = storage if "://" in storage else journal  # a file path: read as a journal
    out.print(f"  optuna-dashboard {dashboard}", highlight=False, soft_wrap=True)
    out.print("    (the answer: the study's Note page and its `pick` attribute)", highlight=False)
    out.print(
        f"  autolayer results --study-name {ctx.study.study_name}"
        + (f" --storage {config.search.storage}" if config.search.storage else ""),
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _mlflow_lines(config: Config, root: Path, runs_url: str | None) -> list[str]:
    """How to open the study's runs table: start `mlflow ui` on the port the URL names, for a
    store read directly; just the URL for a tracking server."""
    from autolayer.tracking import LOCAL_UI, resolve_tracking_uri

    if not config.tracking.enabled:
        return []
    uri = resolve_tracking_uri(config.tracking.tracking_uri, root)
    if uri.startswith(("http://", "https://")):
        return [f"  MLflow: {runs_url or uri}"]
    port = LOCAL_UI.rsplit(":", 1)[1]
    lines = [f"  mlflow ui --backend-store-uri {uri} --port {port}"]
    if runs_url:
        lines.append(f"    then open {runs_url}")
    return lines


def cmd_search(args: argparse.Namespace) -> int:
    config = apply_overrides(load_config(args.config), args)
    return _run_search(config, Path(args.root))


def demo_config_path() -> Path:
    return EXAMPLES_DIR / "organism.yaml"


def cmd_demo(args: argparse.Namespace) -> int:
    path = demo_config_path()
    config = load_config(path) if path.is_file() else Config()
    config.search.space = "single_layer"
    return _run_search(apply_overrides(config, args), Path(args.root))


# --- results -----------------------------------------------------------------------------------


def _results_parser(sub: Any) -> None:
    p = sub.add_parser(
        "results",
        help="Show a study's table from storage, at any time.",
        description="Print each measured candidate over its training seeds (score and C with "
        "intervals covering seed and prompt noise), the set tied with the best, and the free "
        "heuristics' picks beside it, reading only the storage. --trials adds every trial.",
    )
    p.add_argument("--study-name", required=True, metavar="NAME", help="The study to show.")
    p.add_argument(
        "--trials", action="store_true", help="Also list every trial (seeds, pruned, failed)."
    )
    p.add_argument("--json", action="store_true", help="Candidates, baselines and trials as JSON.")
    _add_store_options(p)
    p.set_defaults(handler=cmd_results)


def print_results(out: Any, study: Any, trials: bool) -> None:
    """The candidates table (the answer), its verdict lines, and optionally every trial."""
    from autolayer.report import candidates_table, results_table, verdict_lines

    if trials:
        out.print(results_table(study))
    out.print(candidates_table(study))
    for line in verdict_lines(study):
        out.print(line, highlight=False)


def cmd_results(args: argparse.Namespace) -> int:
    from autolayer.report import results_json
    from autolayer.storage import load_study

    study = load_study(args.study_name, args.storage, Path(args.root))
    if args.json:
        print(json.dumps(results_json(study), indent=2))
        return 0
    print_results(console(), study, trials=args.trials)
    return 0


# --- config ------------------------------------------------------------------------------------


def _config_parser(sub: Any) -> None:
    p = sub.add_parser(
        "config",
        help="Print every config field with its default and meaning.",
        description="The YAML schema: sections, fields, defaults and what each "
        "does. `--config FILE` shows FILE's resolved values instead, and `--section.key "
        "VALUE` options what they change.",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="Show this file's resolved values.")
    add_config_flags(p)
    p.set_defaults(handler=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    config = config_overrides(load_config(args.config) if args.config else Config(), args)
    for section in dataclasses.fields(Config):
        print(f"{section.name}:")
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = json.dumps(getattr(values, f.name))
            print(f"  {f.name + ':':<24}{value:<14} # {f.metadata.get('help', '')}")
    return 0


# --- entry point -------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """Our own progress display replaces the libraries' bars and banners."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # "Generating train split" bars for every local file
    datasets.utils.logging.set_verbosity_error()


def _raise_interrupted(signum: int, frame: Any) -> None:
    from autolayer.errors import Interrupted

    raise Interrupted(signum)


RESUMABLE = ("search", "demo")  # commands whose rerun resumes where the interrupt stopped them
LIGHT = ("search", "demo", "results", "config", "compare")  # they check input before heavy imports


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; user errors become one sentence on stderr and exit code 2; SIGINT and
    SIGTERM one sentence and 128 + the signal (130, 143), with the running trial marked."""
    from autolayer.errors import AutolayerError, Interrupted

    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command not in LIGHT:
        quiet_libraries()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        return int(args.handler(args))
    except AutolayerError as err:
        print(f"autolayer: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head` and closed early
        return 0
    except (Interrupted, KeyboardInterrupt) as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message
        signum = getattr(err, "signum", signal.SIGINT)
        then = (
            "finished trials are saved; rerun the same command to resume"
            if args.command in RESUMABLE
            else "nothing was left half-written"
        )
        print(f"autolayer: interrupted by {signal.Signals(signum).name}; {then}", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
