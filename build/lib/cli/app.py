"""The command line: its parser, and running a command with one-line errors and no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import cli
from cli import db as db_commands
from cli import serve as serve_command
from cli import tasks as tasks_commands
from cli.output import EXIT_BROKEN_PIPE, EXIT_ERROR
from cli.start import cmd_config_show, cmd_status
from cli.tree import CommandTree
from db import DatabaseConnection, DatabaseError
from db.connection import describe_driver_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description=cli.__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=None, help="config.yaml to read (default: ./config.yaml if present)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.set_defaults(handler=cmd_status)
    tree = CommandTree(parser)
    config = tree.group("config", "inspect the configuration")
    tree.command(config, "show", cmd_config_show, "every effective database setting and where it came from")
    db_commands.register(tree)
    tasks_commands.register(tree)
    serve_command.register(tree)
    parser.epilog = tree.overview()
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (DatabaseError, ValueError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        # Driver errors met outside the repository (schema inspection, say): one line, no SQL parameters.
        if args.verbose:
            raise
        print(f"error: {describe_driver_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        DatabaseConnection.reset()
