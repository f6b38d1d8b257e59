"""
The Remote Agents page in a real browser (Debian's chromium driven by Playwright; no browser download)
against a real plane (api-server, scheduler, dag-processor on SQLite) with real agents: each action
taken in the page is checked on the plane. Screenshots go to test-artifacts/ui/ (or $REX_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import requests

from airflow_remote_execution import __version__
from localplane import AIRFLOW, ROOT, Agent, Plane, Proc, free_port, shutdown, wait_for

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
expect.set_options(timeout=30_000)  # every expectation waits for the page's 5 s refresh on a busy machine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DAGS = Path(__file__).parent / "dags"
ARTIFACTS = Path(os.environ.get("REX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
V1 = "/remote_execution/v1"
REFRESH = 30_000  # ms: the page refreshes every 5 s; room for a slow machine
LIVE = re.compile(r"^(healthy|degraded)$")  # degraded: the sentinel may find this shared machine's CPU busy


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/system-deps.sh installs Debian's chromium")
    base = tmp_path_factory.mktemp("ui-plane")
    dags = base / "dags"
    dags.mkdir()
    shutil.copy(DAGS / "remote_ui_demo.py", dags)
    plane = Plane(base / "plane", dags_folder=dags,
                  extra_env={"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer"})
    (plane.home / "passwords.json").write_text(json.dumps({"admin": "admin", "viewer": "viewer"}))
    agents: dict[str, Agent] = {}
    sentinel = None
    try:
        plane.start()
        for name, queues in (("agent-a", "default"), ("agent-b", "analytics,reports")):
            agents[name] = Agent(name, base / name, plane.url, plane.create_agent_token(name, queues),
                                 dags_folder=dags).start()
        for agent in agents.values():
            agent.wait_registered()
        # agent-a's sentinel reports its checks to the plane: the page shows each one.
        sentinel = Proc("sentinel-a", [AIRFLOW, "remote-execution", "sentinel", "--port", str(free_port()),
                                       "--report-interval", "5"], agents["agent-a"].env, agents["agent-a"].home)
        plane.base = base
        plane.dags = dags
        plane.agents = agents
        yield plane
    finally:
        if sentinel:
            sentinel.stop()
        shutdown(plane, list(agents.values()))


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(browser, plane: Plane, user: str, dark: bool = False):
    """Sign in through Airflow's own login form, as a person would."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, color_scheme="dark" if dark else "light")
    if dark:
        context.add_init_script("localStorage.setItem('theme', 'dark')")
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(plane.url + "/")
    page.wait_for_url(re.compile(r".*/login.*"))
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", user)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "login" not in url)
    return page


def open_page(page, plane: Plane) -> None:
    """The top-level nav entry of the plugin leads to the page."""
    page.locator('a[href$="plugin/remote-agents"]').first.click()
    expect(page.get_by_test_id("remote-agents-page")).to_be_visible()


@pytest.fixture(scope="module")
def admin(browser, plane):
    page = login(browser, plane, "admin")
    yield page
    page.context.close()


def row(page, name: str):
    return page.get_by_test_id(f"agent-row-{name}")


def tab(page, label: str) -> None:
    page.get_by_role("tab", name=re.compile(f"^{label}")).click()


def confirm(page, reason: str | None = None) -> None:
    dialog = page.get_by_test_id("confirm-dialog")
    expect(dialog).to_be_visible()
    if reason is not None:
        dialog.get_by_test_id("confirm-reason").fill(reason)
    dialog.get_by_test_id("confirm-button").click()
    expect(dialog).to_be_hidden()


def work(plane: Plane, dag_id: str) -> list[dict]:
    return plane.work_items(dag_id=dag_id)


def admin_agent(plane: Plane, name: str) -> dict:
    return next(a for a in plane.api("GET", f"{V1}/admin/agents").json() if a["name"] == name)


# ------------------------------------------------------------------ tests (in order: they share one plane)


def test_login_and_see_both_agents_with_queues_and_versions(plane, admin):
    open_page(admin, plane)
    version = plane.airflow("version").stdout.strip().splitlines()[-1]
    for name, queues in (("agent-a", ["default"]), ("agent-b", ["analytics", "reports"])):
        r = row(admin, name)
        expect(r).to_be_visible()
        expect(r.get_by_test_id("agent-health")).to_have_text(LIVE, timeout=REFRESH)
        expect(r.get_by_test_id("agent-queue")).to_have_text(queues)
        expect(r.get_by_test_id("agent-versions")).to_contain_text(f"airflow {version}")
        expect(r.get_by_test_id("agent-versions")).to_contain_text("airflow-remote-execution 0.1.0")
        expect(r.get_by_test_id("agent-versions")).to_contain_text("python 3.")
        expect(r.get_by_test_id("agent-slots")).to_have_text("0 / 4")
    expect(admin.get_by_test_id("version-mismatch")).to_have_count(0)
    # agent-a's sentinel report, check by check (on this busy machine it may well be degraded: cpu).
    sentinel = row(admin, "agent-a").get_by_test_id("agent-sentinel")
    expect(sentinel).to_be_visible(timeout=REFRESH)
    if sentinel.get_by_role("button", name=re.compile("passing")).count():
        sentinel.get_by_role("button", name=re.compile("passing")).click()
    for check in ("agent_alive", "token", "clock"):
        expect(sentinel).to_contain_text(check)
    expect(row(admin, "agent-b")).to_contain_text("no report")
    # Filters: by state and by queue.
    admin.get_by_test_id("filter-queue").select_option("reports")
    expect(row(admin, "agent-a")).to_be_hidden()
    expect(row(admin, "agent-b")).to_be_visible()
    admin.get_by_test_id("filter-queue").select_option("")
    admin.get_by_test_id("filter-state").select_option("lost")
    expect(admin.get_by_test_id("agents-table")).to_contain_text("No agent matches these filters.")
    admin.get_by_test_id("filter-state").select_option("")
    expect(row(admin, "agent-a")).to_be_visible()
    shot(admin, "01-agents")

    # An agent on other versions (registered over the agent API as an older agent would): marked.
    old_token = plane.create_agent_token("agent-old", "legacy")
    python = f"{sys.version_info.major}.{sys.version_info.minor}.0"  # another patch release: not marked
    versions = {"airflow": "3.2.1", "airflow-remote-execution": "0.0.9", "python": python}
    r = requests.post(f"{plane.url}{V1}/agents/register", headers={"Authorization": f"Bearer {old_token}"},
                      json={"concurrency": 1, "hostname": "old-host", "versions": versions}, timeout=30)
    assert r.status_code == 200, r.text
    marks = row(admin, "agent-old").get_by_test_id("version-mismatch")
    expect(marks).to_have_text([f"airflow 3.2.1 ≠ plane {version}",
                                f"airflow-remote-execution 0.0.9 ≠ plane {__version__}"])
    expect(row(admin, "agent-old").get_by_test_id("agent-versions")).to_contain_text(f"python {python}")
    shot(admin, "01b-version-mismatch")
    plane.api("DELETE", f"{V1}/admin/agents/agent-old", params={"force": "true"}).raise_for_status()
    expect(row(admin, "agent-old")).to_have_count(0)


def test_drain_with_reason_stops_leasing_and_resume_runs_it(plane, admin):
    open_page(admin, plane)
    row(admin, "agent-a").get_by_role("button", name="Drain").click()
    shot(admin, "02-drain-dialog")
    confirm(admin, reason="node pool upgrade, back at 14:00")
    r = row(admin, "agent-a")
    expect(r.get_by_test_id("agent-health")).to_have_text("draining", timeout=REFRESH)
    expect(r.get_by_test_id("drain-reason")).to_contain_text("node pool upgrade, back at 14:00")
    expect(r.get_by_test_id("drain-reason")).to_contain_text("Drained by admin")
    # On the plane: drained, with the reason, in the admin API and `agents list`.
    assert admin_agent(plane, "agent-a")["drain_reason"] == "node pool upgrade, back at 14:00"
    listed = json.loads(plane.airflow("remote-execution", "agents", "list", "--output", "json").stdout)
    assert next(a for a in listed if a["name"] == "agent-a")["drain_reason"] == "node pool upgrade, back at 14:00"

    # It stops leasing: work for its queue stays queued while it keeps heartbeating.
    run_id = plane.trigger("ui_default")
    wait_for(lambda: work(plane, "ui_default"), 60, "the task queued for agents")
    heartbeat_before = admin_agent(plane, "agent-a")["last_heartbeat_at"]
    time.sleep(12)
    (item,) = work(plane, "ui_default")
    assert (item["state"], item["agent_name"]) == ("queued", None), item
    assert admin_agent(plane, "agent-a")["last_heartbeat_at"] > heartbeat_before, "agent-a stopped heartbeating"
    tab(admin, "Queues")
    expect(admin.get_by_test_id("queue-row-default").get_by_test_id("queue-warning")).to_contain_text(
        "agent-a (drained)", timeout=REFRESH)
    tab(admin, "Agents")
    shot(admin, "03-drained")

    row(admin, "agent-a").get_by_role("button", name="Resume").click()
    confirm(admin)
    expect(row(admin, "agent-a").get_by_test_id("agent-health")).to_have_text(LIVE, timeout=REFRESH)
    assert plane.wait_run("ui_default", run_id, timeout=180) == "success"
    (item,) = plane.settled_work_items(dag_id="ui_default")
    assert (item["state"], item["agent_name"]) == ("success", "agent-a")
    plane.ui_run_id = run_id


def test_task_instance_tab_shows_agent_and_timeline(plane, admin):
    run_id = getattr(plane, "ui_run_id", None)
    if run_id is None:  # the drain test did not get as far
        run_id = plane.trigger("ui_default")
        assert plane.wait_run("ui_default", run_id, timeout=180) == "success"
    admin.goto(f"{plane.url}/dags/ui_default/runs/{run_id}/tasks/hello")
    admin.get_by_role("link", name="Remote execution", exact=True).click()  # the plugin's task instance tab
    panel = admin.get_by_test_id("remote-execution-tab")
    expect(panel).to_be_visible()
    try_1 = panel.get_by_test_id("try-1")
    expect(try_1.get_by_test_id("try-agent")).to_have_text("agent-a")
    expect(try_1.get_by_test_id("try-state")).to_have_text("success")
    for step in ("queued", "leased", "start_confirmed", "running", "finished"):
        expect(try_1.get_by_test_id(f"step-{step}")).to_contain_text(re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"))
    expect(try_1.get_by_test_id("step-leased")).to_contain_text("by agent agent-a")
    assert "/plugin/remote-execution" in admin.url
    shot(admin, "04-task-instance-tab")


def test_queue_without_live_agent_is_a_warning(plane, admin):
    plane.trigger("ui_nowhere")
    wait_for(lambda: work(plane, "ui_nowhere"), 60, "the stranded task queued")
    admin.goto(f"{plane.url}/plugin/remote-agents")
    warning = admin.get_by_test_id("unserved-warning")
    expect(warning).to_contain_text("queued in 'nowhere'", timeout=REFRESH)
    expect(warning).to_contain_text("no live agent serves it")
    tab(admin, "Queues")
    nowhere = admin.get_by_test_id("queue-row-nowhere")
    expect(nowhere.get_by_test_id("queue-queued")).to_have_text("1")
    expect(nowhere.get_by_test_id("queue-warning")).to_be_visible()
    expect(admin.get_by_test_id("queue-row-default").get_by_test_id("queue-warning")).to_have_count(0)
    shot(admin, "05-queues-warning")


def test_token_created_in_page_runs_a_third_agent_and_revoking_it_refuses_the_agent(plane, admin):
    admin.goto(f"{plane.url}/plugin/remote-agents")
    tab(admin, "Tokens")
    admin.get_by_role("button", name="Create token").click()
    admin.get_by_test_id("token-agent-name").fill("agent-c")
    admin.get_by_test_id("token-queues").fill("analytics")
    admin.get_by_test_id("token-dialog-submit").click()
    created = admin.get_by_test_id("new-token")
    expect(created).to_be_visible()
    expect(admin.get_by_test_id("token-dialog")).to_be_hidden()
    token = admin.get_by_test_id("new-token-value").inner_text().strip()
    assert re.fullmatch(r"rex_[0-9a-f]{16}_[A-Za-z0-9_\-]{43}", token), token
    expect(admin.get_by_test_id("snippet-secret")).to_contain_text(f"token: {token}")
    expect(admin.get_by_test_id("snippet-config")).to_contain_text(f"api_url = {plane.url}")
    token_id = token.split("_")[1]
    expect(admin.get_by_test_id(f"token-row-{token_id}").get_by_test_id("token-status")).to_have_text("active")
    shot(admin, "06-token-created")

    agent_c = Agent("agent-c", plane.base / "agent-c", plane.url, token, dags_folder=plane.dags).start()
    plane.agents["agent-c"] = agent_c
    agent_c.wait_registered()
    tab(admin, "Agents")
    expect(row(admin, "agent-c").get_by_test_id("agent-health")).to_have_text(LIVE, timeout=REFRESH)
    expect(row(admin, "agent-c")).to_contain_text(token_id)
    shot(admin, "07-third-agent")

    tab(admin, "Tokens")
    admin.get_by_test_id(f"token-row-{token_id}").get_by_role("button", name="Revoke").click()
    confirm(admin)
    expect(admin.get_by_test_id(f"token-row-{token_id}").get_by_test_id("token-status")).to_have_text("revoked")
    # The plane refuses the agent from its next request on, and says so in the agent's log.
    wait_for(lambda: "Agent token rejected" in agent_c.proc.log_path.read_text(errors="replace"), 60,
             "agent-c refused by the plane")
    assert "was revoked at" in agent_c.proc.log_path.read_text(errors="replace")
    # Rotating agent-b's token: a new one shown once; the old one keeps working for the overlap.
    (old_id,) = [t["id"] for t in plane.api("GET", f"{V1}/admin/tokens", params={"agent_name": "agent-b"}).json()]
    admin.get_by_test_id(f"token-row-{old_id}").get_by_role("button", name="Rotate").click()
    admin.get_by_test_id("rotate-overlap").fill("1h")
    admin.get_by_test_id("token-dialog-submit").click()
    expect(admin.get_by_test_id("token-dialog")).to_be_hidden()
    rotated = admin.get_by_test_id("new-token-value").inner_text().strip()
    assert rotated.startswith("rex_") and rotated.split("_")[1] != old_id
    old = next(t for t in plane.api("GET", f"{V1}/admin/tokens").json() if t["id"] == old_id)
    assert old["status"] == "active" and old["expires_at"] is not None  # ends with the overlap
    expect(admin.get_by_test_id(f"token-row-{rotated.split('_')[1]}")).to_contain_text("rotated from " + old_id)

    tab(admin, "Agents")
    expect(row(admin, "agent-c")).to_contain_text("revoked")
    expect(row(admin, "agent-c").get_by_test_id("agent-health")).to_have_text(re.compile("degraded|lost"))
    expect(row(admin, "agent-c")).to_contain_text(re.compile("its token is revoked|no heartbeat"))
    shot(admin, "08-token-revoked")

    # Remove it (its token is revoked, so it cannot register again).
    row(admin, "agent-c").get_by_role("button", name="Remove").click()
    confirm(admin)
    expect(row(admin, "agent-c")).to_have_count(0)
    assert "agent-c" not in [a["name"] for a in plane.api("GET", f"{V1}/admin/agents").json()]


def test_read_only_user_cannot_act(plane, browser):
    page = login(browser, plane, "viewer")
    try:
        open_page(page, plane)
        expect(row(page, "agent-b")).to_be_visible()
        expect(page.get_by_test_id("read-only-note")).to_be_visible()
        for name in ("Drain", "Resume", "Remove"):
            buttons = page.get_by_role("button", name=name, exact=True)
            for i in range(buttons.count()):
                expect(buttons.nth(i)).to_be_disabled()
        tab(page, "Tokens")
        expect(page.get_by_role("button", name="Create token")).to_be_disabled()
        revoke = page.get_by_role("button", name="Revoke", exact=True)
        for i in range(revoke.count()):
            expect(revoke.nth(i)).to_be_disabled()
        shot(page, "09-read-only")
        # Not only greyed out: the page API refuses the viewer's own session (403).
        status = page.evaluate(
            """async () => (await fetch('/remote_execution/ui/api/agents/agent-b/drain', {method: 'POST',
                 headers: {'Content-Type': 'application/json'}, body: JSON.stringify({reason: 'x'})})).status"""
        )
        assert status == 403
        assert admin_agent(plane, "agent-b")["drained"] is False
    finally:
        page.context.close()


def test_dark_theme(plane, browser):
    page = login(browser, plane, "admin", dark=True)
    try:
        open_page(page, plane)
        expect(row(page, "agent-b")).to_be_visible()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
        assert sum(channels) < 3 * 80, f"not a dark page: {background}"
        shot(page, "10-agents-dark")
        tab(page, "Queues")
        shot(page, "11-queues-dark")
    finally:
        page.context.close()


def test_page_under_a_base_url_path(browser, tmp_path):
    """Behind a path (`[api] base_url = https://host/airflow`): the nav entry, the bundle and the page API follow it."""
    plane = Plane(tmp_path / "subpath")
    plane.env["AIRFLOW__API__BASE_URL"] = f"{plane.url}/airflow"
    plane.env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"{plane.url}/airflow/execution/"
    try:
        plane.airflow("db", "migrate")
        plane.start_component("api-server")
        wait_for(lambda: requests.get(f"{plane.url}/airflow/api/v2/monitor/health", timeout=2).status_code == 200,
                 120, "api-server health under /airflow")
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.goto(f"{plane.url}/airflow/")
        page.wait_for_url(re.compile(r".*/login.*"))
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", "admin")
        page.keyboard.press("Enter")
        page.wait_for_url(lambda url: "login" not in url)
        page.locator('a[href$="plugin/remote-agents"]').first.click()
        expect(page.get_by_test_id("remote-agents-page")).to_contain_text("No agent has registered yet")
        assert page.url == f"{plane.url}/airflow/plugin/remote-agents"
        context.close()
    finally:
        shutdown(plane)
