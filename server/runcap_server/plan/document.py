"""Reading a plan file: YAML to plain data, with the line of every value, and
the JSON Schema's verdict as problems that name their path in the file.

Numbers with a fraction are read as exact `Decimal`s, never binary floats (a
plan states dollars). Duplicate keys, anchors and aliases are refused: a plan
is one page that people review, and every value must be visible where it is
used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

import jsonschema
import yaml

SCHEMA_NAME: Final = "quota-plan.schema.json"
MAX_BYTES: Final = 64 * 1024
"""A plan is one page; a larger file is refused before it is parsed."""

PathPart = str | int
# Fields that hold a secret in other tools' configurations: a plan names the
# environment variable instead.
_SECRET_FIELDS: Final = {
    "routing_key": "routing_key_env",
    "secret": "secret_env",
    "token": "an environment variable (*_env)",
    "password": "an environment variable (*_env)",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong (or, with ``error=False``, worth a second look) in a plan."""

    path: str
    message: str
    line: int | None = None
    error: bool = True

    def where(self, file: str) -> str:
        """``plan.yaml:12 owner.on_call.name`` (the line when known)."""
        place = f"{file}:{self.line}" if self.line else file
        return f"{place} {self.path}"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "message": self.message}


def format_path(parts: Sequence[PathPart]) -> str:
    """``("per_run", "llm", 0, "model")`` -> ``per_run.llm[0].model``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


@dataclass(frozen=True, slots=True)
class Document:
    """A plan file's data and where each value stands in it."""

    data: Any
    lines: dict[tuple[PathPart, ...], int]

    def line(self, parts: Sequence[PathPart]) -> int | None:
        """The line of the value at `parts`, or of its nearest enclosing one."""
        key = tuple(parts)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), None)

    def problem(self, parts: Sequence[PathPart], message: str, *, error: bool = True) -> Problem:
        return Problem(format_path(parts), message, self.line(parts), error)


class PlanFileError(ValueError):
    """A file that is not a readable YAML plan; `problem` says where."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class _Loader(yaml.SafeLoader):
    """SafeLoader with exact decimals."""


def _decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a finite number", node.start_mark
        )
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _decimal)


def read(path: Path) -> Document:
    """Reads and parses a plan file. Raises PlanFileError."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PlanFileError(Problem("(file)", f"cannot read: {error.strerror or error}")) from None
    return parse(data)


def parse(data: bytes) -> Document:
    """Parses a plan's bytes. Raises PlanFileError."""
    if len(data) > MAX_BYTES:
        raise PlanFileError(
            Problem("(file)", f"is {len(data)} bytes; a plan is one page (at most {MAX_BYTES})")
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PlanFileError(Problem("(file)", f"is not UTF-8 text: {error}")) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple[PathPart, ...], int] = {}
        if node is not None:
            _index(node, (), lines, set())
        document = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = error.problem or str(error)
        raise PlanFileError(Problem("(file)", f"is not valid YAML: {problem}", line)) from None
    except yaml.YAMLError as error:
        raise PlanFileError(Problem("(file)", f"is not valid YAML: {error}")) from None
    finally:
        loader.dispose()
    if not isinstance(document, dict):
        raise PlanFileError(Problem("(top level)", "must be a mapping of the plan's fields", 1))
    return Document(document, lines)


def _index(
    node: yaml.Node,
    parts: tuple[PathPart, ...],
    lines: dict[tuple[PathPart, ...], int],
    seen: set[int],
) -> None:
    """Records the line of every value; refuses duplicate keys and aliases."""
    if id(node) in seen:
        raise PlanFileError(
            Problem(
                format_path(parts),
                "anchors and aliases are not allowed in a plan: write each value out",
                node.start_mark.line + 1,
            )
        )
    seen.add(id(node))
    lines[parts] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        keys: dict[object, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            line = key_node.start_mark.line + 1
            if key in keys:
                raise PlanFileError(
                    Problem(
                        format_path((*parts, str(key))),
                        f"is given twice (first on line {keys[key]})",
                        line,
                    )
                )
            keys[key] = line
            _index(value_node, (*parts, str(key)), lines, seen)
            lines[(*parts, str(key))] = line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, (*parts, index), lines, seen)


@cache
def schema() -> dict[str, Any]:
    """The plan's JSON Schema (Draft 2020-12), as shipped with the package."""
    text = resources.files(__package__ or "runcap_server.plan").joinpath(SCHEMA_NAME).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema())


def schema_problems(document: Document) -> list[Problem]:
    """Every place the document breaks the schema, in file order."""
    problems = [
        p for error in _validator().iter_errors(document.data) for p in _explain(document, error)
    ]
    return sorted(problems, key=lambda p: (p.line or 0, p.path))


def _explain(document: Document, error: jsonschema.ValidationError) -> Iterator[Problem]:
    parts = list(error.absolute_path)
    schema_here: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
    instance: Any = error.instance
    if error.validator == "required":
        wanted: list[str] = list(schema_here.get("required", []))
        missing = [name for name in wanted if name not in instance]
        properties = schema_here.get("properties", {})
        for name in missing:
            hint = _description(properties.get(name, {}))
            message = "is required" + (f": {hint}" if hint else "")
            yield document.problem([*parts, name], message)
        return
    if error.validator == "additionalProperties":
        allowed = set(schema_here.get("properties", {}))
        for name in sorted(set(instance) - allowed, key=str):
            message = "is not a field of a plan here"
            if allowed:
                message += f" (expected one of: {', '.join(sorted(allowed))})"
            if str(name) in _SECRET_FIELDS:
                message = (
                    "must not be in a plan: secrets are never written in the file; name the "
                    f"environment variable that holds it instead ({_SECRET_FIELDS[str(name)]})"
                )
            yield document.problem([*parts, str(name)], message)
        return
    if error.validator == "type":
        expected = error.validator_value
        kinds = " or ".join(expected) if isinstance(expected, list) else str(expected)
        yield document.problem(parts, f"must be {_article(kinds)}, got {_show(error.instance)}")
        return
    description = _description(schema_here)
    explained = ("pattern", "enum", "const", "anyOf", "minProperties", "maxProperties")
    if error.validator in explained and description:
        prefix = "" if isinstance(instance, dict) else f"{_show(instance)}: "
        yield document.problem(parts, prefix + description)
        return
    yield document.problem(parts, error.message)


def _description(subschema: dict[str, Any]) -> str:
    text = subschema.get("description", "")
    return text if isinstance(text, str) else ""


def _article(kinds: str) -> str:
    return {"integer": "an integer", "object": "a mapping", "array": "a list"}.get(
        kinds, f"a {kinds}"
    )


def _show(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
