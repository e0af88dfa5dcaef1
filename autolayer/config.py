"""The configuration schema: one dataclass per section, each field documented for `--help`.

A YAML config has the sections `model`, `task`, `proxy`, `search`, `tracking` and `train`.
Unknown keys and wrong types are errors that name the key; every field has a default, so `{}` is
a valid config.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from autolayer.errors import AutolayerError

Algorithm = Literal["grpo", "dr_grpo", "gigpo"]
Objective = Literal["contribution", "score"]
SamplerName = Literal["auto", "grid", "tpe", "gp", "random"]
PrunerName = Literal["none", "interval", "median", "hyperband", "wilcoxon"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Strategy = Literal["only", "mid", "boost"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (shown by `--help` and `autolayer config`)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    name: str = doc(
        "HF hub id, local path, or a bundled model: organism (arithmetic), code_organism, "
        "agent_organism.",
        "organism",
    )
    revision: str | None = doc("Hub revision (branch, tag or commit) to pin.", None)
    dtype: DType = doc(
        "Weight dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16.", "auto"
    )

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name must name a model")


@dataclass
class TaskConfig:
    """A single-turn task in TRL's conventions: a dataset, a prompt and reward functions.

    Built-in tasks (`organism`, `gsm8k`, `humaneval`, `code_organism`, the short-answer tasks for
    real models...) are presets of these same fields; any field set here overrides the preset.
    Any other name is your own task: set `dataset` or `data_files`, and `reward_funcs`.
    """

    name: str = doc(
        "A built-in task (organism, code_organism, gridworld, gsm8k, humaneval, chat_arithmetic; "
        "for real pretrained models the short-answer tasks antonym, next_number, category_pick, "
        "larger_of_two) or a name for your own.",
        "organism",
    )
    dataset: str | None = doc(
        "HF hub id, local directory or file, or a loader (json, csv, parquet, arrow) for "
        "data_files. A path that looks local is never sent to the hub.",
        None,
    )
    dataset_config: str | None = doc("HF dataset configuration name (e.g. `main`).", None)
    data_files: str | list[str] | dict[str, str | list[str]] | None = doc(
        "Local files (jsonl, json, csv, parquet, arrow), or a mapping split -> file(s).", None
    )
    train_split: str | None = doc("Split to train on (default: train).", None)
    eval_split: str | None = doc(
        "Held-out split (default: `test` when present, else eval_fraction of train).", None
    )
    prompt_column: str | None = doc(
        "Column holding the prompt: text, or a list of chat messages (default: prompt).", None
    )
    prompt_template: str | None = doc(
        "Format string over columns that builds the prompt, e.g. 'Q: {question} A:'; for an "
        "environment task, over {history} and {observation}.",
        None,
    )
    chat_template: Literal["auto", "always", "never"] | None = doc(
        "Wrap text prompts as a user turn in the tokenizer's chat template: auto (when it has "
        "one), always, never (default; message-list prompts always use it).",
        None,
    )
    reward_funcs: list[str] | None = doc(
        "Reward functions with TRL's signature f(prompts, completions, **columns) -> "
        "list[float | None], as dotted paths (pkg.module.func) or path/to/file.py:func.",
        None,
    )
    reward_weights: list[float] | None = doc(
        "Weight of each reward function (default: 1 each), as TRL's reward_weights.", None
    )
    max_completion_length: int | None = doc(
        "Tokens generated per completion (default: the built-in task's, else 256).", None
    )
    stop_strings: list[str] | None = doc(
        "Generation stops at any of these strings (the text keeps it, as in transformers).", None
    )
    env: str | None = doc(
        "A multi-turn text environment class (reset(seed) -> str, step(action) -> (obs, "
        "reward, done, info)), as pkg.module.Class or path/to/file.py:Class.",
        None,
    )
    env_kwargs: dict[str, Any] | None = doc("Keyword arguments of the environment class.", None)
    max_turns: int | None = doc("Environment tasks: actions per episode at most (default 8).", None)
    history_turns: int | None = doc(
        "Environment tasks: earlier (observation, action) pairs shown in the prompt (default 0).",
        None,
    )
    train_size: int | None = doc(
        "Training prompts (environment tasks: seeds) to use (None: all available).", None
    )
    eval_size: int | None = doc("Held-out prompts every candidate is scored on.", None)
    eval_fraction: float = doc("For a dataset without an eval split: the share held out.", 0.2)
    seed: int = doc("Seed of the train/eval split.", 0)

    def __post_init__(self) -> None:
        _require(bool(self.name), "task.name must not be empty")
        _require(self.train_size is None or self.train_size > 0, "task.train_size must be positive")
        _require(self.eval_size is None or self.eval_size > 0, "task.eval_size must be positive")
        _require(0 < self.eval_fraction < 1, "task.eval_fraction must be between 0 and 1")
        _require(
            self.max_completion_length is None or self.max_completion_length > 0,
            "task.max_completion_length must be positive",
        )
        _require(
            self.reward_weights is None
            or self.reward_funcs is None
            or len(self.reward_weights) == len(self.reward_funcs),
            "task.reward_weights needs one weight per reward function",
        )
        _require(self.max_turns is None or self.max_turns >= 1, "task.max_turns must be >= 1")
        _require(
            self.history_turns is None or self.history_turns >= 0,
            "task.history_turns must be >= 0",
        )
        _require(
            not self.stop_strings or all(self.stop_strings),
            "task.stop_strings must not contain an empty string",
        )


@dataclass
class ProxyConfig:
    algorithm: Algorithm = doc(
        "RL objective: grpo, dr_grpo (arXiv 2503.20783), or gigpo (arXiv 2505.10978; "
        "multi-turn environment tasks only).",
        "grpo",
    )
    steps: int = doc("Steps (sampled batches) of one proxy run.", 30)
    prompts_per_step: int = doc("Prompts per step; each gets `num_generations` samples.", 16)
    num_generations: int = doc("Group size G: completions sampled per prompt.", 8)
    lr: float = doc("Learning rate of a layer-subset run (searchable per space).", 1e-3)
    full_lr: float = doc("Learning rate of the all-layers reference run (tuned separately).", 1e-4)
    gigpo_gamma: float = doc("gigpo: discount of the step returns within a trajectory.", 0.95)
    gigpo_omega: float = doc("gigpo: weight of the step-level advantage (A_E + omega A_S).", 1.0)
    beta: float = doc("Weight of the k3 KL penalty to the reference (0: no reference).", 0.0)
    epsilon: float = doc("PPO clip range of the importance ratio.", 0.2)
    num_iterations: int = doc("Optimisation passes per sampled batch (TRL's num_iterations).", 1)
    temperature: float = doc("Sampling temperature during training.", 1.0)
    max_grad_norm: float = doc("Gradient clipping norm (0: off).", 1.0)
    micro_batch_size: int | None = doc(
        "Completions per forward/backward pass (None: a step's all at once); a divisor of "
        "prompts_per_step x num_generations. Lower it when a real model runs out of memory.",
        None,
    )
    eval_every: int = doc("Score on the held-out set every this many steps (for pruning).", 10)
    frozen_cache_mb: float = doc(
        "A search keeps each prompt batch's prefill of the layers below a trial's lowest trained "
        "one (held-out and training prompts, the base weights' states) for the trials after it, "
        "up to this many MB; batches past it prefill as usual (0: keep none).",
        1024.0,
    )
    master_weights: Literal["float32", "bfloat16"] = doc(
        "Precision the trained layers' weights are kept in between steps: float32, or bfloat16 "
        "to see which updates bf16 storage drops (Gate III, arXiv 2511.08567).",
        "float32",
    )
    gradient_checkpointing: bool = doc(
        "Non-reentrant activation checkpointing (saves memory).", False
    )
    device: str = doc("auto (CUDA when present, else CPU), cpu, cuda or cuda:N.", "auto")
    devices: int = doc(
        "Devices one proxy run spans, one process each (Lightning's `devices`): a step's "
        "prompts are split among them and their gradients averaged. Above 1, launch with "
        "torchrun --nproc_per_node N (or let Lightning start the processes).",
        1,
    )
    strategy: Literal["auto", "ddp"] = doc(
        "Lightning strategy across `devices`: auto (one device) or ddp.", "auto"
    )
    threads: int | None = doc(
        "CPU threads for torch (None: $OMP_NUM_THREADS if set, else the cores this process may "
        "use, from its CPU affinity and cgroup quota). Lower it when runs share a machine.",
        None,
    )
    seed: int = doc("Seed of sampling and data order; CPU runs are deterministic for it.", 0)

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "num_iterations", "eval_every"):
            _require(getattr(self, key) >= 1, f"proxy.{key} must be at least 1")
        _require(self.num_generations >= 2, "proxy.num_generations must be at least 2")
        batch = self.prompts_per_step * self.num_generations
        _require(
            self.micro_batch_size is None
            or (self.micro_batch_size >= 1 and batch % self.micro_batch_size == 0),
            f"proxy.micro_batch_size must divide prompts_per_step x num_generations = {batch}",
        )
        for key in ("lr", "full_lr", "temperature"):
            _require(getattr(self, key) > 0, f"proxy.{key} must be positive")
        _require(self.threads is None or self.threads >= 1, "proxy.threads must be at least 1")
        _require(self.frozen_cache_mb >= 0, "proxy.frozen_cache_mb must be at least 0")
        _require(self.devices >= 1, "proxy.devices must be at least 1")
        _require(self.strategy in ("auto", "ddp"), "proxy.strategy must be auto or ddp")
        _require(
            self.prompts_per_step % self.devices == 0,
            f"proxy.prompts_per_step ({self.prompts_per_step}) must divide evenly among "
            f"proxy.devices ({self.devices})",
        )
        _require(
            self.devices == 1 or self.micro_batch_size is None,
            "proxy.micro_batch_size works on one device; use proxy.devices 1 with it",
        )
        _require(self.beta >= 0 and self.epsilon > 0, "proxy.beta must be >= 0 and epsilon > 0")
        _require(0 <= self.gigpo_gamma <= 1, "proxy.gigpo_gamma must be between 0 and 1")


@dataclass
class SearchConfig:
    space: str = doc(
        "Search space: a name in search_spaces/ (single_layer, every_other_layer, window, "
        "subset) or a path to a YAML file.",
        "single_layer",
    )
    objective: Objective = doc("What trials maximise: contribution C or raw score.", "contribution")
    n_trials: int | None = doc(
        "Trials to run in this invocation, baseline and racing runs included (default: the rest "
        "of an exhaustive space, else 20, then the baselines and racing).",
        None,
    )
    timeout: float | None = doc("Stop starting new trials after this many seconds.", None)
    max_total_steps: int | None = doc(
        "Budget of proxy steps (sampled batches) summed over the study.", None
    )
    sampler: SamplerName = doc("auto: grid for spaces under 64 points, else TPE.", "auto")
    pruner: PrunerName = doc(
        "Early stopping of bad trials from intermediate held-out scores: interval (stops a trial "
        "only when an optimistic extrapolation of its curve stays below the best's lower bound), "
        "median, hyperband, wilcoxon or none.",
        "interval",
    )
    seed: int = doc("Sampler seed.", 0)
    study_name: str | None = doc("Study name; rerunning with the same name resumes it.", None)
    storage: str | None = doc(
        "Optuna storage URL; default: a journal file under mlruns/ (postgresql://... to share).",
        None,
    )
    warm_start: list[int] | None = doc("Layers to try first (None: the middle layers).", None)
    signal_steps: int | None = doc(
        "single_layer spaces: first train all layers this many proxy steps and try the layers "
        "in order of how far that moved them (None: off).",
        None,
    )
    seeds: int = doc(
        "Training seeds per contender: after the search, the best candidate and every candidate "
        "statistically tied with it are rerun with seeds proxy.seed+1, ... until the best "
        "separates or each contender has this many (racing); 1: one run per candidate, and "
        "intervals without training-seed noise.",
        3,
    )
    contenders: int = doc(
        "Racing: only the top this many candidates (by their first run) may get more seeds, so "
        "a race costs at most contenders x (seeds - 1) runs where many candidates stay tied.",
        4,
    )
    baselines: bool = doc(
        "After the search, also measure the free heuristics' picks (middle, last, Spectrum's SNR "
        "ranking, a random candidate) of the pick's size, unpruned, and show them beside it.",
        True,
    )

    def __post_init__(self) -> None:
        _require(
            self.study_name is None
            or (bool(self.study_name) and not set("/\\\0") & set(self.study_name)
                and not self.study_name.startswith(".")),
            "search.study_name must be a plain name: no path separators and no leading dot",
        )  # fmt: skip
        for key in ("n_trials", "timeout", "max_total_steps", "signal_steps"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"search.{key} must be positive")
        _require(self.seeds >= 1, "search.seeds must be at least 1")
        _require(self.contenders >= 2, "search.contenders must be at least 2")


@dataclass
class TrackingConfig:
    tracking_uri: str | None = doc(
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under mlruns/).", None
    )
    experiment: str | None = doc("MLflow experiment name (default: the study name).", None)
    enabled: bool = doc("Log to MLflow at all.", True)

    def __post_init__(self) -> None:
        _require(
            self.tracking_uri is None or bool(self.tracking_uri.strip()),
            "tracking.tracking_uri must not be empty (leave it out for the default)",
        )


@dataclass
class TrainConfig:
    strategy: Strategy = doc(
        "only: train the chosen layers; mid: the k middle; boost: all, chosen faster.", "only"
    )
    top_k: int = doc("How many of the study's best layers to train.", 1)
    steps: int = doc("GRPOTrainer max_steps.", 60)
    lr: float | None = doc(
        "Learning rate of the chosen layers (None: the lr the study measured those layers at, "
        "else proxy.lr).",
        None,
    )
    boost_base_lr: float = doc("boost strategy: learning rate of the other layers.", 1e-4)
    output_dir: str = doc(
        "Where the trained model and the layer delta are written.", "outputs/train"
    )

    def __post_init__(self) -> None:
        _require(self.top_k >= 1 and self.steps >= 1, "train.top_k and train.steps must be >= 1")
        _require(self.lr is None or self.lr > 0, "train.lr must be positive")
        _require(self.boost_base_lr > 0, "train.boost_base_lr must be positive")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AutolayerError(message)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    return names.get(tp, "null" if tp is type(None) else str(tp))


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except AutolayerError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            key_type, value_type = typing.get_args(tp)
            return {
                _coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}")
                for k, v in value.items()
            }
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-5, without a dot, as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise AutolayerError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise AutolayerError(f"config section '{prefix}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AutolayerError(
            f"unknown config key '{prefix}.{unknown[0]}'; valid keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, name)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config; errors name the offending key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AutolayerError("a config file must be a YAML mapping of sections")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise AutolayerError(
            f"unknown config section '{unknown[0]}'; valid sections: model, task, proxy, search, "
            "tracking, train"
        )
    return _build(Config, data, "")


def load_config(path: str | Path) -> Config:
    """Read a YAML config file; a missing file or invalid YAML is a one-sentence error."""
    path = Path(path)
    if not path.is_file():
        raise AutolayerError(f"config file {path} does not exist")
    config = config_from_dict(read_yaml(path, "config file"))
    anchor_task_paths(config.task, path.parent)
    return config


def anchor_task_paths(task: TaskConfig, base: Path) -> None:
    """Relative data and reward-file paths that do not exist from the working directory are read
    relative to the config file, so `autolayer search --config examples/x/task.yaml` works from
    anywhere."""

    def anchor(value: str) -> str:
        if Path(value).is_absolute() or Path(value).exists() or not (base / value).exists():
            return value
        return str(base / value)

    if task.dataset is not None:
        task.dataset = anchor(task.dataset)
    files = task.data_files
    if isinstance(files, str):
        task.data_files = anchor(files)
    elif isinstance(files, list):
        task.data_files = [anchor(f) for f in files]
    elif isinstance(files, dict):
        task.data_files = {
            k: anchor(v) if isinstance(v, str) else [anchor(f) for f in v] for k, v in files.items()
        }
    if task.env is not None and ".py:" in task.env:
        task.env = anchor(task.env.rpartition(":")[0]) + ":" + task.env.rpartition(":")[2]
    if task.reward_funcs is not None:
        task.reward_funcs = [
            anchor(f.rpartition(":")[0]) + ":" + f.rpartition(":")[2] if ".py:" in f else f
            for f in task.reward_funcs
        ]


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; a syntax error is one sentence naming the file and line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise AutolayerError(f"{what} {path} is not valid YAML{where}") from None


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
}  # section name -> its dataclass: the one list `--section.key` flags are generated from


def override(config: Config, values: dict[str, str]) -> Config:
    """`config` with dotted keys (`{"proxy.lr": "3e-4"}`) set from command-line text, each value
    read as YAML would read it, and every section validated again as a file would be."""
    data = config.to_dict()
    for dotted, text in values.items():
        section, _, key = dotted.partition(".")
        data[section][key] = _read_value(text, typing.get_type_hints(SECTIONS[section])[key])
    return config_from_dict(data)


def _takes_text(tp: Any) -> bool:
    """Whether a field accepts a plain string (str, str | None, a Literal of strings...)."""
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_takes_text(a) for a in typing.get_args(tp))
    return False


def _read_value(text: str, tp: Any) -> Any:
    """Command-line text as the field needs it: YAML for numbers, lists and mappings, but a
    field that takes text keeps it as typed (a study named 2024, a revision 0123456, `yes`)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML: the schema says whether the text itself is acceptable
    if _takes_text(tp) and not isinstance(value, (list, dict)):
        return text
    return value


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, for `--help` and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def require_one_device(proxy: ProxyConfig) -> None:
    """The search runs each proxy run in one process: several devices per run need a launcher."""
    if proxy.devices > 1:
        raise AutolayerError(
            "the search runs every proxy run in its own single process, so proxy.devices must "
            "be 1 (share a study among several workers instead; one run spans N devices when "
            "autolayer.proxy.run_proxy is launched under torchrun)"
        )
