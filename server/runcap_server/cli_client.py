"""Client subcommands of the `runcap` command (filled in with the Python client)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    pass
