from pathlib import Path

import pytest

from autolayer.config import Config, config_from_dict, load_config
from autolayer.errors import AutolayerError


def test_empty_config_is_all_defaults() -> None:
    assert config_from_dict({}) == Config()


def test_sections_are_read_and_ints_accepted_for_floats() -> None:
    config = config_from_dict({"proxy": {"lr": 1, "steps": 5}, "search": {"warm_start": [3, 4]}})
    assert config.proxy.lr == 1.0 and isinstance(config.proxy.lr, float)
    assert config.proxy.steps == 5
    assert config.search.warm_start == [3, 4]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"proxy": {"stepz": 3}}, "unknown config key 'proxy.stepz'"),
        ({"proxi": {}}, "unknown config section 'proxi'"),
        ({"proxy": {"steps": "ten"}}, "'proxy.steps' must be an integer, got 'ten'"),
        ({"proxy": {"steps": True}}, "'proxy.steps' must be an integer"),
        ({"proxy": {"algorithm": "ppo"}}, "'proxy.algorithm' must be one of 'grpo', 'dr_grpo'"),
        ({"search": {"warm_start": [1, "x"]}}, "'search.warm_start' must be"),
        ({"proxy": {"num_generations": 1}}, "num_generations must be at least 2"),
        ({"proxy": 3}, "section 'proxy' must be a mapping"),
        ({"proxy": {"devices": 0}}, "proxy.devices must be at least 1"),
        ({"model": {"dtype": "fp32"}}, "'model.dtype' must be one of 'auto', 'float32'"),
        ({"model": {"name": " "}}, "model.name must name a model"),
        ({"tracking": {"tracking_uri": ""}}, "tracking.tracking_uri must not be empty"),
        ({"proxy": {"strategy": "fsdp"}}, "'proxy.strategy' must be one of 'auto', 'ddp'"),
        (
            {"proxy": {"devices": 3, "prompts_per_step": 16}},
            "proxy.prompts_per_step (16) must divide evenly among proxy.devices (3)",
        ),
        (
            {"proxy": {"devices": 2, "micro_batch_size": 8}},
            "proxy.micro_batch_size works on one device",
        ),
    ],
)
def test_bad_configs_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(AutolayerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)


def test_load_config_errors_are_one_sentence(tmp_path) -> None:
    with pytest.raises(AutolayerError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy: [unclosed\n")
    with pytest.raises(AutolayerError, match="not valid YAML at line"):
        load_config(bad)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize(
    "path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_space_loads(path: Path) -> None:
    from autolayer.spaces import load_space

    space = load_space(str(path))
    strided = {"every_other_layer": ("single_layer", 2)}  # a kind's variant, named for what it does
    assert (space.kind, space.stride) == strided.get(path.stem, (path.stem, 1))


def test_micro_batch_must_divide_the_step() -> None:
    with pytest.raises(
        AutolayerError, match="must divide prompts_per_step x num_generations = 128"
    ):
        config_from_dict({"proxy": {"micro_batch_size": 48}})
    assert config_from_dict({"proxy": {"micro_batch_size": 32}}).proxy.micro_batch_size == 32


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\\\b", ".hidden", ""])
def test_a_study_name_cannot_be_a_path(name: str) -> None:
    with pytest.raises(AutolayerError, match="study_name must be a plain name"):
        config_from_dict({"search": {"study_name": name}})


def test_yaml_floats_without_a_dot_are_numbers(tmp_path) -> None:
    """PyYAML (YAML 1.1) reads `1e-5` as a string; the schema takes it as the number it means."""
    path = tmp_path / "c.yaml"
    path.write_text("proxy:\n  lr: 1e-5\n  full_lr: 3E-4\ntrain:\n  lr: 2e-6\n")
    config = load_config(path)
    assert (config.proxy.lr, config.proxy.full_lr, config.train.lr) == (1e-5, 3e-4, 2e-6)
    path.write_text("proxy:\n  lr: 1e\n")
    with pytest.raises(AutolayerError, match="'proxy.lr' must be a number, got '1e'"):
        load_config(path)


def test_command_line_text_keeps_its_type_where_the_schema_wants_text() -> None:
    """`--search.study_name 2024` is a study named 2024, `--model.revision 0123456` a commit, not
    numbers; numbers, switches and lists are read as YAML reads them."""
    from autolayer.config import override

    config = override(
        Config(),
        {"search.study_name": "2024", "model.revision": "0123456", "search.seeds": "5",
         "search.baselines": "false", "task.reward_weights": "[1, 0.5]", "train.lr": "null"},
    )  # fmt: skip
    assert (config.search.study_name, config.model.revision) == ("2024", "0123456")
    assert (config.search.seeds, config.search.baselines) == (5, False)
    assert config.task.reward_weights == [1.0, 0.5] and config.train.lr is None
