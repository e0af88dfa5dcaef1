"""Tasks: a train split, a held-out eval split and reward functions, in TRL's conventions.

A `Task` is what the proxy RL loop, the held-out scorer and `autolayer train` (TRL's
GRPOTrainer) share. Its datasets have a `prompt` column, plain text or a list of chat messages,
plus any columns the reward functions read; the reward functions have TRL's signature
(`autolayer.rewards`). A multi-turn task names an environment instead (`autolayer.envs`): its
rows are seeds, its rewards come from the environment, and `max_completion_length` bounds each
action.

Users reach the API three ways: the `task` section of a YAML config (`TaskConfig`), a built-in
name (`builtin_tasks.BUILTINS`, presets of the same fields), or a `Task` built in Python and
passed to `run_search` / `run_training` / `measure`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets

from autolayer.builtin_tasks import BUILTINS, resolved
from autolayer.config import TaskConfig
from autolayer.envs import EnvFactory
from autolayer.errors import AutolayerError
from autolayer.hub import require_hub
from autolayer.rewards import RewardFunc, is_messages, resolve_callable, reward_identity

DEFAULT_MAX_COMPLETION = 256  # TRL's max_completion_length default
DEFAULT_MAX_TURNS = 8
DEFAULT_ENV_TRAIN_SEEDS = 10_000
DEFAULT_ENV_EVAL_EPISODES = 200
EVAL_SEED_OFFSET = 1_000_000  # held-out episodes use seeds from here, training seeds below it
LOADERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


@dataclass(frozen=True)
class Task:
    """A single-turn RL task; see the module docstring for the conventions."""

    name: str
    train: datasets.Dataset  # column `prompt` (text or chat messages) plus reward columns
    eval: datasets.Dataset  # the same columns; held out, in a fixed order
    reward_funcs: tuple[RewardFunc, ...]
    reward_weights: tuple[float, ...] | None = None  # None: 1 each, as TRL
    max_completion_length: int = DEFAULT_MAX_COMPLETION  # tokens per completion
    stop_strings: tuple[str, ...] = ()  # generation stops after any of these
    chat_template: str = "never"  # text prompts: wrap in the chat template (auto/always/never)
    env: EnvFactory | None = None  # multi-turn: makes one environment per trajectory
    max_turns: int = 1  # multi-turn: actions per episode at most
    history_turns: int = 0  # multi-turn: earlier (observation, action) pairs in each prompt
    turn_template: str | None = None  # multi-turn: format string over {history}, {observation}

    def __post_init__(self) -> None:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise AutolayerError(
                f"task '{self.name}' has {len(self.reward_weights)} reward weights for "
                f"{len(self.reward_funcs)} reward functions"
            )


# --- loading ------------------------------------------------------------------------------------


def load_task(config: TaskConfig, tokenizer: Any = None) -> Task:
    """Build the task `config` describes; with a tokenizer, its chat template is applied."""
    builtin = BUILTINS.get(config.name)
    cfg = resolved(config)
    if cfg.env is not None:
        task = _env_task(cfg)
        return for_tokenizer(task, tokenizer) if tokenizer is not None else task
    if builtin is None and cfg.dataset is None and cfg.data_files is None:
        raise AutolayerError(
            f"unknown task '{config.name}'; built-in tasks: {', '.join(sorted(BUILTINS))}; for "
            "your own task set task.dataset or task.data_files, and task.reward_funcs"
        )
    if not cfg.reward_funcs:
        raise AutolayerError(f"task '{cfg.name}' has no reward functions; set task.reward_funcs")
    if builtin is not None and builtin.make_splits is not None:
        train, eval_ = builtin.make_splits(cfg)
    else:
        train, eval_ = load_splits(cfg)
        if builtin is not None and builtin.prepare is not None:
            source = _source(cfg)
            train, eval_ = builtin.prepare(train, source), builtin.prepare(eval_, source)
    train = _with_prompts(_head(train, cfg.train_size), cfg, "train")
    eval_ = _with_prompts(_head(eval_, cfg.eval_size), cfg, "eval")
    if cfg.eval_size is not None and len(eval_) < cfg.eval_size:
        raise AutolayerError(
            f"task.eval_size is {cfg.eval_size} but the held-out split has only {len(eval_)} "
            "rows; lower eval_size"
        )
    task = Task(
        name=cfg.name,
        train=train,
        eval=eval_,
        reward_funcs=tuple(resolve_callable(spec, "reward function") for spec in cfg.reward_funcs),
        reward_weights=tuple(cfg.reward_weights) if cfg.reward_weights else None,
        max_completion_length=cfg.max_completion_length or DEFAULT_MAX_COMPLETION,
        stop_strings=tuple(cfg.stop_strings or ()),
        chat_template=cfg.chat_template or "never",
    )
    return for_tokenizer(task, tokenizer) if tokenizer is not None else task


def _env_task(cfg: TaskConfig) -> Task:
    """A multi-turn task: seeds for rows, the environment for rewards."""
    factory = functools.partial(
        resolve_callable(cfg.env or "", "environment"), **(cfg.env_kwargs or {})
    )
    train = cfg.train_size or DEFAULT_ENV_TRAIN_SEEDS
    held_out = cfg.eval_size or DEFAULT_ENV_EVAL_EPISODES
    return Task(
        name=cfg.name,
        train=datasets.Dataset.from_dict({"seed": list(range(train))}),
        eval=datasets.Dataset.from_dict({"seed": [EVAL_SEED_OFFSET + i for i in range(held_out)]}),
        reward_funcs=(),
        max_completion_length=cfg.max_completion_length or 32,
        stop_strings=tuple(cfg.stop_strings or ()),
        chat_template=cfg.chat_template or "never",
        env=factory,
        max_turns=cfg.max_turns or DEFAULT_MAX_TURNS,
        history_turns=cfg.history_turns or 0,
        turn_template=_turn_template(cfg.prompt_template),
    )


def _turn_template(template: str | None) -> str | None:
    """An environment task's prompt_template, checked: only {history} and {observation}."""
    if template is None:
        return None
    try:
        template.format(history="", observation="")
    except (KeyError, IndexError, ValueError) as err:
        raise AutolayerError(
            f"task.prompt_template of an environment task may use only {{history}} and "
            f"{{observation}}; it has {err}"
        ) from None
    return template


def _source(cfg: TaskConfig) -> str:
    return str(cfg.data_files if cfg.data_files is not None else cfg.dataset)


def load_splits(cfg: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and eval splits of `cfg.dataset` / `cfg.data_files`."""
    data = _read(cfg)
    source = _source(cfg)
    train_name = cfg.train_split or "train"
    if train_name not in data:
        raise AutolayerError(
            f"the data at {source} has no '{train_name}' split; its splits are "
            f"{', '.join(data)}; set task.train_split"
        )
    if cfg.eval_split is not None and cfg.eval_split not in data:
        raise AutolayerError(
            f"the data at {source} has no '{cfg.eval_split}' split; its splits are "
            f"{', '.join(data)}"
        )
    eval_name = cfg.eval_split or ("test" if "test" in data else None)
    if eval_name is not None:
        train, eval_ = data[train_name], data[eval_name]
    else:
        if len(data[train_name]) < 2:
            raise AutolayerError(f"the '{train_name}' split of {source} has fewer than 2 rows")
        held_out = data[train_name].train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, eval_ = held_out["train"], held_out["test"]
    for name, split in (("train", train), ("eval", eval_)):
        if len(split) == 0:
            raise AutolayerError(f"the {name} split of the data at {source} is empty")
    return train, eval_


def _read(cfg: TaskConfig) -> datasets.DatasetDict:
    """Load the dataset; a path that looks local is checked here and never sent to the hub."""
    try:
        if cfg.data_files is not None:
            files = (
                cfg.data_files if isinstance(cfg.data_files, dict) else {"train": cfg.data_files}
            )
            for group in files.values():
                for path in [group] if isinstance(group, str) else group:
                    _require_file(path)
            loader = cfg.dataset or _loader_for(next(iter(files.values())))
            data = datasets.load_dataset(loader, cfg.dataset_config, data_files=files)
        else:
            data = _read_source(str(cfg.dataset), cfg.dataset_config)
    except AutolayerError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        OSError,
        datasets.exceptions.DatasetGenerationError,
    ) as err:
        raise AutolayerError(
            f"cannot read the task data {_source(cfg)}: {str(err).splitlines()[0][:200]}"
        ) from err
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    _require_utf8(data, _source(cfg))
    return data


def _require_utf8(data: datasets.DatasetDict, source: str) -> None:
    """Refuse text that is not UTF-8 now, before the model loads: the loaders keep its bytes
    as they are, and the first read of the row raises UnicodeDecodeError, hours in."""
    import pyarrow as pa

    for split_name, split in data.items():
        table = split.data.table
        for column in table.column_names:
            try:
                table.column(column).validate(full=True)  # full: every string's bytes
            except pa.ArrowInvalid as err:
                raise AutolayerError(
                    f"cannot read the task data {source}: the '{column}' column of its "
                    f"{split_name} split is not valid UTF-8 text ({str(err).splitlines()[0]}); "
                    "save the file as UTF-8"
                ) from None


def _read_source(source: str, config_name: str | None) -> Any:
    local = Path(source).expanduser()
    if _suffix(source) in LOADERS:
        _require_file(source)
        return datasets.load_dataset(LOADERS[_suffix(source)], data_files=str(local))
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return datasets.load_from_disk(str(local))  # written by save_to_disk
        return datasets.load_dataset(str(local), config_name)
    if source.startswith((".", "/", "~")) or local.exists():
        raise AutolayerError(f"task data {source} does not exist")
    return _load_hub(source, config_name)


def _load_hub(source: str, config_name: str | None) -> Any:
    require_hub(f"the dataset '{source}'")
    try:
        return datasets.load_dataset(source, config_name)
    except (ConnectionError, FileNotFoundError) as err:  # offline, or no such dataset
        raise AutolayerError(
            f"could not load the dataset '{source}' from the Hugging Face hub "
            f"({type(err).__name__}); point task.data_files at local files instead"
        ) from err


def _suffix(path: str) -> str:
    """`.jsonl` for `a.jsonl` and `a.jsonl.gz` (datasets decompresses on the fly)."""
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    return suffixes[-1] if suffixes else ""


def _loader_for(files: str | list[str]) -> str:
    first = files if isinstance(files, str) else files[0]
    if _suffix(first) not in LOADERS:
        raise AutolayerError(
            f"cannot tell the format of {first}; use a .jsonl, .json, .csv, .parquet or .arrow "
            "file, or set task.dataset to the loader name"
        )
    return LOADERS[_suffix(first)]


def _require_file(path: str) -> None:
    if not Path(path).expanduser().is_file():
        raise AutolayerError(f"task data file {path} does not exist")


def _head(split: datasets.Dataset, size: int | None) -> datasets.Dataset:
    """The first `size` rows (all when None), so truncation is deterministic."""
    return split if size is None else split.select(range(min(size, len(split))))


def _with_prompts(split: datasets.Dataset, cfg: TaskConfig, name: str) -> datasets.Dataset:
    """The `prompt` column from `prompt_template`, or renamed from `prompt_column`; checked."""
    columns = split.column_names
    if cfg.prompt_template is not None:
        template = cfg.prompt_template
        try:
            prompts = [template.format(**row) for row in split]
        except KeyError as err:
            raise AutolayerError(
                f"task.prompt_template refers to the column {err}, which the {name} data lacks; "
                f"its columns are {', '.join(columns)}"
            ) from None
        except (IndexError, ValueError) as err:
            raise AutolayerError(
                f"task.prompt_template is not a valid format string: {err}"
            ) from None
        if "prompt" in columns:
            split = split.remove_columns("prompt")
        return split.add_column("prompt", prompts)
    column = cfg.prompt_column or "prompt"
    if column not in columns:
        raise AutolayerError(
            f"the {name} data has no '{column}' column (its columns are {', '.join(columns)}); "
            "set task.prompt_column or task.prompt_template"
        )
    if column != "prompt":
        if "prompt" in columns:
            split = split.remove_columns("prompt")
        split = split.rename_column(column, "prompt")
    first = split[0]["prompt"] if len(split) else ""
    if not (isinstance(first, str) or is_messages(first)):
        raise AutolayerError(
            f"the {name} data's prompts must be text or lists of chat messages "
            f"({{'role': ..., 'content': ...}}), got {type(first).__name__}"
        )
    return _without_empty_prompts(split, name)


def _is_empty(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not is_messages(prompt) or not any(str(m["content"] or "").strip() for m in prompt)


def _without_empty_prompts(split: datasets.Dataset, name: str) -> datasets.Dataset:
    """`split`, refused if a prompt is empty: the model would be scored on continuing nothing,
    and the prompt-paired evidence would count a row that asks nothing."""
    empty = sum(map(_is_empty, split["prompt"]))
    if empty:
        raise AutolayerError(
            f"{empty} of the {len(split)} prompts of the {name} data are empty; remove those rows "
            "or point task.prompt_column or task.prompt_template at the text"
        )
    return split


# --- prompts and chat templates -----------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def for_tokenizer(task: Task, tokenizer: Any) -> Task:
    """The task with text prompts wrapped as a user turn where its `chat_template` asks for it.

    With `auto` and a tokenizer without a chat template (a base model), chat-message prompts
    become `transcript`s instead. An environment task keeps its seeds; its mode resolves to
    always or never for `render`.
    """
    mode = task.chat_template
    if mode == "always" and not has_chat_template(tokenizer):
        raise AutolayerError(
            f"task '{task.name}' sets chat_template: always but the tokenizer has no chat template"
        )
    chat = task.env is None and len(task.eval) > 0 and is_messages(task.eval[0]["prompt"])
    if mode == "auto" and chat and not has_chat_template(tokenizer):
        bos = bos_prefix(tokenizer)

        def plain(row: dict[str, Any]) -> dict[str, Any]:
            return {"prompt": transcript(row["prompt"], bos)}

        return replace(task, train=task.train.map(plain), eval=task.eval.map(plain))
    if mode == "never" or (mode == "auto" and not has_chat_template(tokenizer)):
        return replace(task, chat_template="never") if task.env is not None else task
    if task.env is not None:
        return replace(task, chat_template="always")

    def wrap(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["prompt"]
        return {"prompt": prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]}

    return replace(
        task, train=task.train.map(wrap), eval=task.eval.map(wrap), chat_template="never"
    )


def bos_prefix(tokenizer: Any) -> str:
    """The BOS token where the tokenizer starts every text with it (Gemma's does), else "".

    Prompts are tokenized without special tokens, as TRL does, since a chat template writes its
    own; a plain-text prompt for such a model must then carry its BOS itself.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not callable(tokenizer):
        return ""
    return str(tokenizer.bos_token) if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def transcript(messages: list[dict[str, str]], bos: str = "") -> str:
    """Chat messages as the plain few-shot text a base model continues: `bos`, a system
    message, then "Q: <user>" and "A: <assistant>" lines, ending in "A:"."""
    parts = [bos]
    for message in messages:
        content, role = message["content"], message["role"]
        parts.append(f"{content}\n\n" if role == "system" else
                     f"Q: {content}\n" if role == "user" else f"A: {content}\n\n")  # fmt: skip
    return "".join(parts) + "A:"


def prompt_text(prompt: Any, tokenizer: Any) -> str:
    """The text a model is given: chat messages through the tokenizer's template, as TRL does."""
    if isinstance(prompt, str):
        return prompt
    if not has_chat_template(tokenizer):
        raise AutolayerError(
            "the task's prompts are chat messages but the tokenizer has no chat template"
        )
    return str(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))


# --- identity, for caches -----------------------------------------------------------------------


def task_fingerprint(task: Task) -> str:
    """Everything about a task that changes a held-out score: eval rows, rewards, lengths, stops."""
    digest = hashlib.sha256()
    for part in (
        task.name,
        str(task.max_completion_length),
        json.dumps(task.stop_strings),
        task.chat_template,
        json.dumps(task.reward_weights),
        *(reward_identity(f) for f in task.reward_funcs),
        reward_identity(task.env) if task.env is not None else "",
        f"{task.max_turns}/{task.history_turns}",
    ):
        digest.update(part.encode() + b"\0")
    for row in task.eval:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\0")
    return digest.hexdigest()[:16]
