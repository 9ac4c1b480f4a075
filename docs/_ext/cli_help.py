"""A Sphinx directive that prints the `--help` of ``python -m pyarraypool``.

    ```{cli-help}
    ```                      the top-level help
    ```{cli-help} stats
    ```                      the help of one subcommand

The text comes from the parser itself (pyarraypool.__main__.build_parser) at
build time, so the page always shows the options the CLI really has.
"""

from __future__ import annotations

import argparse
import os

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.application import Sphinx

WIDTH = "88"  # columns argparse wraps the help to, whatever the terminal


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_text(name: str | None) -> str:
    from pyarraypool.__main__ import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        if name is None:
            return parser.format_help()
        subs = subcommands(parser)
        if name not in subs:
            known = ", ".join(sorted(subs))
            raise ValueError(f"python -m pyarraypool has no subcommand {name!r} (it has {known})")
        return subs[name].format_help()
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


class CliHelp(Directive):
    optional_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0] if self.arguments else None
        try:
            text = help_text(name)
        except Exception as e:  # a broken CLI must fail the -W build, not vanish
            raise self.error(f"cli-help: {e}") from e
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
