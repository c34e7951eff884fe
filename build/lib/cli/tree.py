"""Command groups and commands, remembered for the overview at the end of --help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeAlias

from cli.output import EXIT_USAGE

Handler = Callable[[argparse.Namespace], int]


SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandTree:
    """Groups (`db`, `tasks`, ...) of commands, remembered for the overview at the end of --help."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.groups = parser.add_subparsers(title="commands", metavar="COMMAND")
        self.listed: list[tuple[str, str]] = []

    def group(self, name: str, help_text: str) -> SubParsers:
        sub = self.groups.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=lambda _args: usage(sub))
        return sub.add_subparsers(title="commands", metavar="COMMAND")

    def command(self, group: SubParsers, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        self.listed.append((sub.prog.removeprefix("main.py "), help_text))
        return sub

    def overview(self) -> str:
        width = max(len(name) for name, _ in self.listed)
        lines = (f"  {name:<{width}}  {help_text}" for name, help_text in self.listed)
        return "every command (each has --help):\n" + "\n".join(lines)


def usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
