"""The `train`, `export` and `merge` commands: from a study's layer pick to a model and configs.

`autolayer.cli` calls `register_train_commands(sub)`; handlers return an exit code and raise
AutolayerError for user mistakes, which `autolayer.cli.main` prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autolayer.config import Config, load_config
from autolayer.errors import AutolayerError

if TYPE_CHECKING:
    import optuna

    from autolayer.export import LayerChoice
    from autolayer.train import TrainResult

EXPORT_FORMATS = ("json", "axolotl", "peft", "llamafactory", "swift", "trl", "all")
ROOT_HELP = (
    "Directory of the embedded stores (Optuna journal, MLflow SQLite, artifacts, score "
    "cache). Default: mlruns"
)
STORAGE_HELP = (
    "Optuna storage URL of the study (journal:PATH, sqlite:///PATH, postgresql://...). "
    "Default: search.storage of the config, else the journal file under --root."
)
LAYERS_HELP = (
    "Explicit layers, e.g. '3', '3,7', '10-12' or 'all'; bypasses the study. Mutually "
    "exclusive with --study-name."
)


def register_train_commands(sub: Any) -> None:
    """Add `train`, `export` and `merge` to the `autolayer` subcommands."""
    _train_parser(sub)
    _export_parser(sub)
    _merge_parser(sub)


# ---- shared --------------------------------------------------------------------------------------


def _selector_options(p: argparse.ArgumentParser, top_k_help: str) -> None:
    p.add_argument(
        "--study-name",
        metavar="NAME",
        help="Take the layers from this study's best complete trials.",
    )
    p.add_argument("--layers", metavar="LAYERS", help=LAYERS_HELP)
    p.add_argument("--top-k", type=int, metavar="K", help=top_k_help)
    p.add_argument("--storage", metavar="URL", help=STORAGE_HELP)
    p.add_argument("--root", metavar="DIR", default="mlruns", help=ROOT_HELP)


def _check_selectors(args: argparse.Namespace, needs_one: bool = True) -> None:
    if args.layers is not None and args.study_name is not None:
        raise AutolayerError("give either --layers or --study-name, not both")
    if needs_one and args.layers is None and args.study_name is None:
        raise AutolayerError("say which layers: --study-name NAME (the study's best) or --layers")


def num_layers_of(name: str, revision: str | None = None) -> int:
    from autolayer.models import find_layer_stack, model_skeleton

    return len(find_layer_stack(model_skeleton(name, revision)))


def _choose(
    args: argparse.Namespace,
    study: optuna.Study | None,
    strategy: str,
    top_k: int,
    num_layers: int,
) -> tuple[int, ...]:
    from autolayer.layers import parse_layers
    from autolayer.train import select_layers

    if args.layers is not None:
        return parse_layers(args.layers, num_layers)
    return select_layers(study, strategy, top_k, num_layers)


# ---- train ---------------------------------------------------------------------------------------


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="Train the chosen layers with TRL's GRPOTrainer and save the model.",
        description="Run GRPO (TRL) on the layers a study found best (--study-name), on explicit "
        "layers (--layers), or on the k middle layers (--strategy mid). Scores the "
        "model before and after on the held-out prompts and writes OUT/model (a "
        "Hugging Face model directory), OUT/delta (the chosen layers alone, for "
        "`autolayer merge`) and OUT/train_summary.json.",
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE.yaml",
        help="YAML config: model, task, proxy (RL settings) and train sections.",
    )
    _selector_options(
        p,
        "How many of the study's best layers to train (overrides train.top_k; "
        "with --strategy mid: how many middle layers).",
    )
    from autolayer.cli_flags import add_config_flags, add_tracking_aliases, alias

    for flag, key, metavar in (
        ("--strategy", "train.strategy", "{only,mid,boost}"),
        ("--steps", "train.steps", "N"),
        ("--lr", "train.lr", "LR"),
        ("--out", "train.output_dir", "DIR"),
        ("--device", "proxy.device", "DEVICE"),
    ):
        alias(p, flag, key, metavar)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing non-empty output directory (only once the new one is complete).",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="Also train all layers for the same steps (at proxy.full_lr) and report C at this "
        "run's horizon against it, instead of against the study's shorter proxy-horizon run. "
        "Costs a second training run and a second copy of the model in memory.",
    )
    add_tracking_aliases(p)
    add_config_flags(p)
    p.set_defaults(handler=cmd_train)


def apply_train_overrides(config: Config, args: argparse.Namespace) -> Config:
    """Command-line options win over the YAML file; returns the validated config."""
    from autolayer.cli_flags import config_overrides
    from autolayer.config import override

    config = config_overrides(config, args)
    given = {"train.top_k": args.top_k, "search.storage": args.storage}  # the study selectors
    chosen = {key: str(value) for key, value in given.items() if value is not None}
    return override(config, chosen) if chosen else config


def cmd_train(args: argparse.Namespace) -> int:
    from autolayer.processes import is_main_process
    from autolayer.storage import load_study
    from autolayer.train import run_training

    config = apply_train_overrides(load_config(args.config), args)
    strategy = config.train.strategy
    _check_selectors(args, needs_one=strategy != "mid")
    if strategy == "mid" and args.layers is not None:
        raise AutolayerError("--strategy mid picks the middle layers itself; drop --layers")
    root = Path(args.root)
    study = load_study(args.study_name, config.search.storage, root) if args.study_name else None
    num_layers = num_layers_of(config.model.name, config.model.revision)
    layers = _choose(args, study, strategy, config.train.top_k, num_layers)
    result = run_training(
        config,
        layers,
        strategy,
        study=study,
        root=root,
        out_dir=config.train.output_dir,
        overwrite=args.overwrite,
        reference=args.reference,
    )
    if is_main_process():  # one report, not one per rank of a distributed launch
        _print_train(result, config)
    return 0


def _print_train(result: TrainResult, config: Config) -> None:
    from rich.console import Console

    console = Console()
    before, after = result.before.score, result.after.score
    layers = ",".join(map(str, result.layers))
    console.print(
        f"[bold]trained layers {layers}[/] ({result.strategy}, {result.steps} steps, "
        f"{result.trainable_params:,} trainable parameters) in {result.seconds:.1f} s"
    )
    console.print(
        f"held-out score {before:.3f} → {after:.3f} ({after - before:+.3f}) on "
        f"{len(result.after.outcomes)} prompts"
    )
    c = result.contribution
    if c is not None and c.value is not None:
        console.print(f"contribution C = {c} ({result.contribution_note})", highlight=False)
    else:
        console.print(f"contribution C: {result.contribution_note}", highlight=False)
    console.print(f"model:   {result.model_dir}", highlight=False, soft_wrap=True)
    delta_note = "" if result.strategy != "boost" else " (chosen layers only: boost changed all)"
    console.print(f"delta:   {result.delta_dir}{delta_note}", highlight=False, soft_wrap=True)
    console.print(f"summary: {result.summary_path}", highlight=False, soft_wrap=True)
    if result.run_id:
        console.print(f"MLflow run: {result.run_id}", highlight=False)
    console.print(
        f"merge the delta into the base: autolayer merge --base {config.model.name} "
        f"--delta {result.delta_dir} --out DIR",
        highlight=False,
        soft_wrap=True,
    )


# ---- export --------------------------------------------------------------------------------------


def _export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="Write a layer choice as configs for Axolotl, PEFT, LLaMA-Factory, "
        "ms-swift or a TRL script.",
        description="Turn the study's best layers (--study-name) or explicit layers (--layers) "
        "into each trainer's own config, using the exact parameter names of the "
        "model. Formats that cannot express the set refuse with the reason.",
    )
    p.add_argument(
        "--format",
        required=True,
        metavar="{" + ",".join(EXPORT_FORMATS) + "}",
        help="json: the canonical record; axolotl: unfrozen_parameters YAML; peft: a "
        "LoraConfig on the chosen layers; llamafactory: freeze-tuning keys (only "
        "first/last N layers); swift: a `swift rlhf` command; trl: a runnable "
        "GRPO script; all: every format that can express the set.",
    )
    _selector_options(
        p,
        "How many of the study's best layers to export (default: train.top_k of --config, else 1).",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help="HF hub id, local path or `organism` (default: the config's model, else "
        "the model the study recorded).",
    )
    p.add_argument("--revision", metavar="REV", help="Hub revision of --model to pin.")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML config supplying the model, learning rate and RL objective.",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default="exports",
        help="Directory to write the files into. Default: exports",
    )
    p.set_defaults(handler=cmd_export)


def _export_model(
    args: argparse.Namespace, config: Config | None, study: optuna.Study | None
) -> tuple[str, str | None]:
    if args.model:
        return args.model, args.revision
    if config is not None:
        return config.model.name, config.model.revision
    from autolayer.study import StudyRecord

    record = StudyRecord.of(study) if study is not None else None
    if record is not None and record.model:
        return record.model, record.model_revision
    raise AutolayerError("say which model the layers belong to: --model NAME or --config FILE")


def build_choice(args: argparse.Namespace) -> LayerChoice:
    """The LayerChoice the export options describe."""
    from autolayer.export import choice_from_model
    from autolayer.models import find_layer_stack, model_skeleton
    from autolayer.storage import default_storage_url, load_study
    from autolayer.study import study_evidence

    _check_selectors(args)
    config = load_config(args.config) if args.config else None
    root = Path(args.root)
    storage = args.storage or (config.search.storage if config else None)
    study = load_study(args.study_name, storage, root) if args.study_name else None
    name, revision = _export_model(args, config, study)
    model = model_skeleton(name, revision)
    top_k = args.top_k or (config.train.top_k if config else 1)
    layers = _choose(args, study, "only", top_k, len(find_layer_stack(model)))
    evidence: dict[str, Any] = {"source": "given by hand (--layers)"}
    lr = config.train.lr if config else None
    if study is not None:
        evidence, study_lr = study_evidence(study, layers, storage or default_storage_url(root))
        lr = study_lr if study_lr is not None else lr
    algorithm: str = config.proxy.algorithm if config else "grpo"
    if config is None and study is not None:
        from autolayer.study import StudyRecord

        algorithm = StudyRecord.of(study).algorithm or algorithm
    return choice_from_model(
        model,
        name,
        layers,
        revision=revision,
        evidence=evidence,
        learning_rate=lr,
        algorithm=algorithm,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from autolayer.export import FORMATS, write_export

    if args.format not in EXPORT_FORMATS:
        raise AutolayerError(
            f"unknown export format {args.format!r}; use one of {', '.join(EXPORT_FORMATS)}"
        )
    choice = build_choice(args)
    if args.format != "all":
        for path in write_export(choice, args.format, args.out):
            print(path)
        return 0
    written = 0
    for fmt in FORMATS:
        try:
            for path in write_export(choice, fmt, args.out):
                print(path)
                written += 1
        except AutolayerError as err:  # a format that cannot express the set: say why, go on
            print(f"skipped {fmt}: {err}")
    if not written:
        raise AutolayerError(f"no export format could be written to {args.out}")
    return 0


# ---- merge ---------------------------------------------------------------------------------------


def _merge_parser(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a trained-layers delta into its base model.",
        description="Load the base model, check it is the one the delta was trained from "
        "(hashes of the replaced parameters), copy the trained layers in, and save a "
        "full Hugging Face model directory.",
    )
    p.add_argument(
        "--base",
        required=True,
        metavar="MODEL",
        help="The base model: HF hub id, local path or `organism`.",
    )
    p.add_argument(
        "--delta",
        required=True,
        metavar="DIR",
        help="A delta directory written by `autolayer train` (OUT/delta).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="Where to save the merged model.")
    p.add_argument(
        "--overwrite", action="store_true", help="Replace an existing non-empty output directory."
    )
    p.set_defaults(handler=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from autolayer.delta import merge_to_dir
    from autolayer.train import refuse_existing

    refuse_existing(Path(args.out), args.overwrite)
    out = merge_to_dir(args.base, args.delta, args.out, overwrite=args.overwrite)
    print(f"merged model saved to {out}")
    return 0
