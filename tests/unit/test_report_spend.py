"""Showback sums each run's own spend: a parent's committed total includes
its subagents' commits, and a listed child must not be counted twice."""

from __future__ import annotations

from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb
from runcap_server import report


def listed(run_id: str, committed: int, parent: str = "", agent: str = "a") -> pb.ListedRun:
    run = budget_pb2.Run(run_id=run_id, parent_run_id=parent, labels={"agent": agent}, team_id="ml")
    run.create_time.FromSeconds(1_700_000_000)
    return pb.ListedRun(run=run, state=budget_pb2.BudgetState(committed_micros=committed))


def test_a_listed_subagents_spend_counts_once_under_its_own_agent() -> None:
    # root spent 1.00 itself; child (agent b) 0.50, of which grandchild 0.20.
    runs = [
        listed("root", 1_500_000),
        listed("child", 500_000, parent="root", agent="b"),
        listed("grandchild", 200_000, parent="child", agent="c"),
    ]
    assert report.own_spend(runs) == {"root": 1_000_000, "child": 300_000, "grandchild": 200_000}
    (team,) = report.aggregate(runs, "team")
    assert team.runs == 3
    assert team.spend_micros == 1_500_000
    assert team.top_agents() == [("a", 1_000_000), ("b", 300_000), ("c", 200_000)]
    assert report.daily_spend(runs, "team") == {"2023-11-14": {"ml": 1_500_000}}


def test_a_child_whose_parent_is_not_listed_keeps_all_its_spend() -> None:
    runs = [listed("child", 500_000, parent="older-root")]
    (team,) = report.aggregate(runs, "team")
    assert team.spend_micros == 500_000
