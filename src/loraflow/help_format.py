"""``--help`` with each option's default, for ``loraflow`` and its recipes' own parsers."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags and options without one."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):  # flags: their name says it
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser with ``HelpFormatter``; its subcommands' parsers are of its class too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
