"""The `carbonscale` console script: a CLI of small verbs over one library.

Each module in `carbonscale.commands` adds one verb group (`ring`, `whisper`,
`gen`, `relay`, ...) through `register(subparsers)`; the parser it builds sets
`func`, which returns the exit code. Adding a verb group is adding a module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from carbonscale import CarbonscaleError, ExitStatus, __version__, commands


def command_groups() -> list[str]:
    """The verb groups: the modules of carbonscale.commands (a directory listing, not
    pkgutil, whose imports cost more start-up time than a small fill takes)."""
    return sorted(
        name.removesuffix(".py")
        for name in os.listdir(commands.__path__[0])
        if name.endswith(".py") and not name.startswith("_")
    )


def terminal_columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (and the
    compression modules it imports) on every start."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized by terminal_columns(): argparse builds one for
    every add_argument, and the stock one imports shutil to size itself."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width=None
    ) -> None:
        width = terminal_columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """ArgumentParser with HelpFormatter by default; subparsers are built as their
    parent's class, so every verb's parser is one too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that verb group is imported (fast start-up:
    `carbonscale ring locate` must not pay for numpy-free verbs' imports, nor
    they for its)."""
    parser = Parser(
        prog="carbonscale",
        description="Operate Graphite clusters: ring placement, whisper fill, relays.",
    )
    parser.add_argument("--version", action="version", version=f"carbonscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = command_groups()
    for name in [only] if only in names else names:
        module = importlib.import_module(f"{commands.__name__}.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    # Daemon verbs dump every thread's stack to the journal on a signal.
    from carbonscale import stackdump

    stackdump.install_for_daemon(args.func)
    try:
        return int(args.func(args) or ExitStatus.OK)
    except CarbonscaleError as exc:
        print(f"carbonscale: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("carbonscale: interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        # `carbonscale ring locate ... | head` closed the pipe: not an error.
        sys.stderr.close()
        return ExitStatus.OK
