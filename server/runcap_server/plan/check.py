"""Checking a plan: the file, the schema, the typed plan, the rules, the figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runcap_server.plan import rules
from runcap_server.plan.costs import Costs, Prices, compute
from runcap_server.plan.document import Document, PlanFileError, Problem, read, schema_problems
from runcap_server.plan.model import Plan, build


@dataclass
class Report:
    """What `runcap plan check` found. `costs` is set once prices were applied
    to a plan whose models all have one."""

    file: str
    document: Document | None = None
    plan: Plan | None = None
    costs: Costs | None = None
    prices_version: str = ""
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.error]

    @property
    def valid(self) -> bool:
        return self.plan is not None and not self.errors


def check_file(path: Path, prices: Prices | None) -> Report:
    """Reads and checks a plan; with `prices` None, only what needs no prices."""
    try:
        document = read(path)
    except PlanFileError as error:
        return Report(str(path), problems=[error.problem])
    return check_document(document, prices, str(path))


def check_document(document: Document, prices: Prices | None, file: str = "plan") -> Report:
    report = Report(file, document)
    report.problems = schema_problems(document)
    if report.problems:
        return report  # the typed plan needs a document of the right shape
    plan, problems = build(document)
    report.problems += problems
    report.plan = plan
    report.problems += rules.offline(plan, document)
    if prices is not None:
        report.prices_version = prices.version
        report.costs = compute(plan, prices)
        report.problems += rules.priced(plan, document, prices, report.costs)
    report.problems.sort(key=lambda p: (not p.error, p.line or 0, p.path))
    return report
