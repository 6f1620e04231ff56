"""The dashboard in a real headless browser (Debian's chromium, driven by
Playwright; Playwright's own browsers are never downloaded), against a real
server with a real operator key: sign in, watch a run's bar move as the
test spends through the Python client (no reload), suspend the run with its
button and see the next Reserve blocked, resume it, approve a pending
approval with its button, and read the showback charts.

Screenshots go to build/test-artifacts/dashboard/ (the path is printed).
Without chromium the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from runcap.v1 import budget_pb2
from tests.integration.test_dashboard_http import USD, Dashboard, new_id, start_dashboard

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "test-artifacts" / "dashboard"
CHROMIUM = Path(os.environ.get("RUNCAP_CHROMIUM", "/usr/bin/chromium"))


def need_chromium() -> None:
    """Skips without chromium (or Playwright), but fails under CI=true."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    elif not _playwright_installed():
        missing = "Playwright is not installed (pip install -e '.[dev]')"
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test needs it in CI: {missing}")
    pytest.skip(missing)


def width(percent: int) -> re.Pattern[str]:
    """An inline style's width, as the browser writes it back (40% for 40.00%)."""
    return re.compile(rf"width: {percent}%")


def _playwright_installed() -> bool:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


async def test_the_dashboard_in_a_headless_browser(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    need_chromium()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=10_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    reporter: Any = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"dashboard screenshots: {ARTIFACTS}")

    dash: Dashboard = start_dashboard(tmp_path)
    coder = dash.client("coder")
    run_id = new_id("coder")
    await coder.create_run(run_id, limit_micros=5 * USD, labels={"agent": "coder"})
    first = await coder.reserve_once(run_id, 500_000)
    await coder.commit(run_id, first.reservation_id, 500_000)
    gated = new_id("deploy")
    await coder.create_run(
        gated,
        limit_micros=5 * USD,
        labels={"agent": "deploy"},
        policy=budget_pb2.RunPolicy(approval_percent=50),
    )
    problems: list[str] = []
    try:
        async with async_playwright() as playwright:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=args
            )
            page = await browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console: {message.text}") if message.type == "error" else None
                ),
            )

            # Sign in: a wrong key is refused, the operator key is kept for the tab.
            await page.goto(dash.url + "/")
            await page.get_by_label("API key").fill("rck_ops_wrong")
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("alert")).to_contain_text("not valid")
            await page.get_by_label("API key").fill(dash.secrets["ops"])
            await page.get_by_role("button", name="Sign in").click()

            # The run's bar moves as the test spends, with no reload.
            row = page.locator(f'tr[data-run-id="{run_id}"]')
            label = row.locator(".bar-label")
            committed = row.locator(".seg.committed")
            await expect(label).to_have_text("10% · $0.50 of $5.00")
            await expect(committed).to_have_attribute("style", width(10))
            await expect(page.get_by_role("status").first).to_have_text("Live")
            await page.evaluate("window.notReloaded = true")
            held = await coder.reserve_once(run_id, 1_500_000)
            await expect(label).to_have_text("40% · $0.50 + $1.50 held of $5.00")
            await expect(row.locator(".seg.held")).to_have_attribute("style", width(30))
            await coder.commit(run_id, held.reservation_id, 1_500_000)
            await expect(label).to_have_text("40% · $2.00 of $5.00")
            await expect(committed).to_have_attribute("style", width(40))
            await expect(row.locator(".burn")).to_have_text(re.compile(r"^\$[1-9][\d.]*/min$"))
            await expect(row.locator(".eta")).to_have_text(re.compile(r"^\d+(s|m\d\ds)$"))
            assert await page.evaluate("window.notReloaded") is True
            await page.screenshot(path=ARTIFACTS / "runs.png", full_page=True)

            # The run page: Suspend blocks the next Reserve; Resume lets it through.
            await row.get_by_role("link", name=run_id).click()
            await expect(page.get_by_role("heading", name=f"Run {run_id}")).to_be_visible()
            await expect(page.locator("svg.timeline .line-label.ceiling")).to_have_text(
                "ceiling $5.00"
            )
            events = page.locator("table.events tbody tr")
            await expect(events.first).to_contain_text("$1.50 of $1.50 held")
            status = page.locator('[data-figure="status"] dd')
            await page.get_by_role("button", name="Suspend").click()
            await expect(status).to_have_text("suspended")
            await expect(page.get_by_role("button", name="Resume")).to_be_enabled()
            blocked = await coder.reserve_once(run_id, 100_000)
            assert blocked.decision == budget_pb2.DECISION_BLOCK
            assert blocked.reason == budget_pb2.DECISION_REASON_SUSPENDED
            await expect(page.locator('[data-figure="flags"] dd')).to_contain_text("SUSPENDED")
            await page.screenshot(path=ARTIFACTS / "run-suspended.png", full_page=True)
            await page.get_by_role("button", name="Resume").click()
            await expect(status).to_have_text("open")
            allowed = await coder.reserve_once(run_id, 100_000)
            assert allowed.decision == budget_pb2.DECISION_ALLOW
            assert await page.evaluate("window.notReloaded") is True

            # A pending approval, approved with its button.
            await page.goto(f"{dash.url}/runs/{gated}")
            await expect(page.get_by_role("heading", name=f"Run {gated}")).to_be_visible()
            asked = await coder.reserve_once(gated, 3 * USD)
            assert asked.decision == budget_pb2.DECISION_APPROVAL_REQUIRED
            pending = page.locator(f'[data-approval-id="{asked.approval_id}"]')
            await expect(pending).to_be_visible()
            await page.screenshot(path=ARTIFACTS / "run-approval.png", full_page=True)
            await pending.get_by_role("button", name="Approve spend").click()
            await expect(pending).to_have_count(0)
            await expect(page.locator(".approvals")).to_have_text("None.")
            after = await coder.reserve_once(gated, 3 * USD)
            assert after.decision == budget_pb2.DECISION_ALLOW

            # Showback, as charts.
            await page.get_by_role("link", name="Showback").click()
            await expect(page.get_by_role("heading", name="Spend per day per team")).to_be_visible()
            await expect(page.locator('svg.daily rect[data-group="ml"]')).to_have_count(1)
            await expect(page.locator('svg.agents rect[data-agent="coder"]')).to_have_count(1)
            await expect(page.locator("table.report tbody tr").first).to_contain_text("ml")
            await page.screenshot(path=ARTIFACTS / "showback.png", full_page=True)
            await browser.close()
    finally:
        await coder.close()
        dash.process.stop()
    # The one refusal the browser logs is the wrong key's, on purpose.
    refused = [problem for problem in problems if "status of 401 (Unauthorized)" in problem]
    assert len(refused) == 1
    assert [problem for problem in problems if problem not in refused] == []
