"""The README's Python example runs as written against a live server."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(server_target: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0].replace("127.0.0.1:50051", server_target)
    exec(compile(code, str(README), "exec"), {})


def test_readme_lists_exactly_two_setup_commands() -> None:
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", quickstart, flags=re.S)
    assert [line.split()[:2] for line in commands[0].strip().splitlines()] == [
        ["make", "serve"],
        ["make", "test"],
    ]
