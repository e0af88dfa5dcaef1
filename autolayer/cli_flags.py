"""The `--section.key VALUE` options every config-reading command shares, and short aliases for
them: one definition for `autolayer search`, `demo` and `train`."""

from __future__ import annotations

import argparse

from autolayer.config import SECTIONS, Config, field_help, override

OVERRIDE = "override:"  # dest prefix of the generated `--section.key` options


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """`--section.key VALUE` for every key of the config schema, with the schema's help text:
    applied after the YAML file and before the command's own options, read as YAML reads a
    value and validated as a file is."""
    parser.usage = "%(prog)s [options] [--section.key VALUE ...]"  # not 80 generated options
    group = parser.add_argument_group(
        "config overrides",
        "Any key of the YAML file, e.g. --proxy.lr 3e-4 or --search.seeds 1.",
    )
    for section, cls in SECTIONS.items():
        for name, text in field_help(cls).items():
            group.add_argument(
                f"--{section}.{name}",
                dest=f"{OVERRIDE}{section}.{name}",
                metavar="VALUE",
                default=argparse.SUPPRESS,
                help=text.replace("%", "%%"),
            )


def config_overrides(config: Config, args: argparse.Namespace) -> Config:
    """`config` with the `--section.key` options given on the command line."""
    given = {k.removeprefix(OVERRIDE): v for k, v in vars(args).items() if k.startswith(OVERRIDE)}
    return override(config, given) if given else config


def alias(
    parser: argparse.ArgumentParser,
    flag: str,
    key: str,
    metavar: str = "VALUE",
    const: str | None = None,
    help: str | None = None,
) -> None:
    """A short name for `--section.key` (the same destination, the schema's help text); with
    `const`, a switch that sets the key to it."""
    section, _, name = key.partition(".")
    text = (help or field_help(SECTIONS[section])[name]).replace("%", "%%") + f" (--{key})"
    dest = f"{OVERRIDE}{key}"
    if const is None:
        parser.add_argument(flag, dest=dest, metavar=metavar, default=argparse.SUPPRESS, help=text)
    else:
        parser.add_argument(
            flag, dest=dest, action="store_const", const=const, default=argparse.SUPPRESS, help=text
        )


def add_tracking_aliases(parser: argparse.ArgumentParser) -> None:
    alias(parser, "--tracking-uri", "tracking.tracking_uri", "URI")
    alias(parser, "--no-tracking", "tracking.enabled", const="false", help="Do not log to MLflow.")
