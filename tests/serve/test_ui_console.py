"""The web console on a registry alone (`lorabay hub ui`), in a real headless chromium.

One `lorabay hub ui` process (API keys on, the tiny base to check fits against) serves
the module; each test opens its own browser context, signs in with a key and reads the
page as a person would. The gateway's own console (playground, traffic) is in
test_ui_gateway.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner
from uitools import (
    ADMIN_KEY,
    HOSTILE,
    TEAM_A_KEY,
    TEAM_B_KEY,
    fill_registry,
    hub_list,
    page_opener,
    running_browser,
    shown_rows,
    write_keys,
)

from lorabay.cli.main import cli
from lorabay.hub import Registry

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a browser and a server: seconds each

READY = re.compile(r"console on (http://\S+)/ui")


class ConsoleProcess:
    """`lorabay hub ui` as a user runs it; its URL from the line it prints."""

    def __init__(self, args: list[str]):
        command = [sys.executable, "-m", "lorabay.cli.main", "hub", "ui", *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_url(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := READY.search(line):
                    return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("hub ui did not start:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def filled(tiny_base, make_lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    url = f"file://{root / 'registry'}"
    made = fill_registry(Registry.open(url), tiny_base, make_lora, root)
    return url, made, write_keys(root / "keys.yaml")


@pytest.fixture(scope="module")
def console(filled, tiny_base):
    url, _, keys = filled
    process = ConsoleProcess(
        [
            *("--registry", url, "--port", "0", "--api-keys", str(keys)),
            *("--base", str(tiny_base), "--max-rank", "16"),
        ]
    )
    try:
        yield process.wait_url()
    finally:
        assert process.stop() == 0, "\n".join(process.lines)


@pytest.fixture(scope="module")
def browser():
    with running_browser() as browser:
        yield browser


@pytest.fixture
def open_page(browser, console):
    with page_opener(browser, console) as open_:
        yield open_


def test_adapters_list_is_hub_list_for_the_key(open_page, filled):
    url, _, _ = filled
    page = open_page(TEAM_A_KEY)
    expected = hub_list(url, TEAM_A_KEY)
    rows = shown_rows(page)
    assert [r["ref"] for r in rows] == [r["ref"] for r in expected]
    for row, listed in zip(rows, expected, strict=True):
        assert row["aliases"] == listed["aliases"]
        assert row["cells"][0] == listed["name"] and row["cells"][8] == listed["created_by"]
    # --all: the yanked version too, marked
    page.page.check("#filter-yanked")
    page.wait_loaded("adapters")
    everything = hub_list(url, TEAM_A_KEY, "--all")
    rows = shown_rows(page)
    assert [r["ref"] for r in rows] == [r["ref"] for r in everything]
    assert [r["ref"] for r in everything if r["yanked"]] == ["team-a/old:1"]
    assert "yanked" in rows[[r["ref"] for r in rows].index("team-a/old:1")]["cells"][1]
    # the fit column: rank 32 does not fit --max-rank 16
    fits = {r["ref"]: r["cells"][9] for r in rows}
    assert fits["team-a/wide:1"] == "no" and fits["team-a/summarize:1"] == "yes"
    assert "team-b" not in page.received()


def test_filters_narrow_the_rows(open_page):
    page = open_page(ADMIN_KEY)
    assert {r["ref"].split("/")[0] for r in shown_rows(page)} == {"team-a", "team-b"}
    page.page.select_option("#filter-namespace", "team-b")
    assert [r["ref"] for r in shown_rows(page)] == ["team-b/classify:1", "team-b/judge:1"]
    page.page.select_option("#filter-kind", "reward")
    assert [r["ref"] for r in shown_rows(page)] == ["team-b/judge:1"]
    page.page.select_option("#filter-namespace", "")
    page.page.select_option("#filter-kind", "")
    page.page.select_option("#filter-label", "task=summaries")
    assert [r["ref"] for r in shown_rows(page)] == ["team-a/summarize:1", "team-a/summarize:2"]
    page.page.select_option("#filter-label", "")
    page.page.fill("#filter-text", "dpo")
    assert [r["ref"] for r in shown_rows(page)] == ["team-a/summarize-dpo:1"]


def test_second_key_sees_only_its_own(open_page, filled):
    url, _, _ = filled
    page = open_page(TEAM_B_KEY)
    assert (
        [r["ref"] for r in shown_rows(page)]
        == [r["ref"] for r in hub_list(url, TEAM_B_KEY)]
        == ["team-b/classify:1", "team-b/judge:1"]
    )
    page.open("#/version/team-b%2Fjudge%3A1", "version")
    received = page.received()
    assert "team-a" not in received and "summarize" not in received
    # another tenant's version is the gateway's own 404, as for one that does not exist
    page.open("#/version/team-a%2Fsummarize%3A1", "error")
    message = page.texts(".error")[0]
    assert (
        message == "The model 'team-a/summarize:1' does not exist or you do not have access to it."
    )
    page.errors.remove(
        "Failed to load resource: the server responded with a status of 404 (Not Found)"
    )


def test_user_text_is_shown_as_text(open_page):
    page = open_page(TEAM_A_KEY)
    cell = page.page.eval_on_selector(
        '#adapters tr[data-ref="team-a/summarize:1"] td.description', "td => td.textContent"
    )
    assert cell == HOSTILE
    page.open("#/version/team-a%2Fsummarize%3A1", "version")
    assert page.texts("#description") == [HOSTILE]
    assert page.page.evaluate("window.__pwned") is None
    # the page's only scripts are its own; the description made no element
    assert page.page.eval_on_selector_all("main script, main img", "n => n.length") == 0
    scripts = page.page.eval_on_selector_all("script", "n => n.map(s => s.src)")
    assert scripts == [f"{page.url}/ui/static/console.js"]


def test_version_page_draws_the_lineage(open_page, filled):
    _, made, _ = filled
    page = open_page(TEAM_A_KEY)
    page.open("#/version/team-a%2Fsummarize%3A2", "version")
    nodes = page.page.eval_on_selector_all(
        "#lineage g.node",
        "gs => gs.map(g => [g.dataset.kind, g.dataset.role, g.dataset.ref, g.dataset.id])",
    )
    assert [n[:3] for n in nodes] == [
        ["base", "", ""],
        ["adapter", "ancestor", "team-a/summarize:1"],
        ["adapter", "self", "team-a/summarize:2"],
        ["adapter", "child", "team-a/summarize-dpo:1"],
        ["dataset", "", ""],
    ]
    edges = page.page.eval_on_selector_all(
        "#lineage line.edge", "ls => ls.map(l => [l.dataset.from, l.dataset.to])"
    )
    first, second, child = made["first"].digest, made["second"].digest, made["child"].digest
    assert sorted(edges) == sorted(
        [["base", first], [first, second], [second, child], ["dataset:sha256:" + "d" * 64, second]]
    )
    labels = page.texts("#lineage .edge-label")
    assert labels.count("sft") == 1 and labels.count("dpo") == 1
    assert page.texts("#method") == ["sft"]
    text = page.page.inner_text("main")
    assert "eval_accuracy" in text and "lorabay label --mode dpo" in text and "be brief" in text
    # the judge is another tenant's adapter: named nowhere
    assert "(not visible to this key)" in page.texts("#provenance td")
    assert "team-b" not in page.received()
    # the training curve the run pushed (trainer_state.json), one chart per metric
    assert page.page.eval_on_selector_all(
        "#curve svg.chart", "s => s.map(c => c.dataset.title)"
    ) == ["loss"]
    assert page.texts("#fit") == ["Fits the served base tiny."]
    history = page.texts("#alias-history tbody tr")
    assert len(history) == 2 and "alias=canary version=2" in history[0]  # newest first
    assert "alias=prod version=1" in history[1]
    assert "trainer_state.json" in page.texts("#files td")
    # a parent is a link: clicking it opens that version
    page.page.click('#lineage g.node[data-role="ancestor"]')
    page.wait_loaded("version")
    assert page.texts("#title")[0].startswith("team-a/summarize:1")


def test_api_wants_the_key_and_guards_every_answer(console, tiny_base):
    for path in ("/ui/api/info", "/ui/api/adapters", "/ui/api/version?ref=team-a/old:1"):
        refused = httpx.get(f"{console}{path}")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.get(f"{console}{path}", headers={"Authorization": "Bearer sk-nobody-000"})
        assert wrong.status_code == 401
    auth = {"Authorization": f"Bearer {TEAM_B_KEY}"}
    hidden = httpx.get(f"{console}/ui/api/version?ref=team-a/summarize:1", headers=auth)
    missing = httpx.get(f"{console}/ui/api/version?ref=team-b/nothing:1", headers=auth)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].replace("team-a/summarize", "X") == missing.json()[
        "error"
    ]["message"].replace("team-b/nothing", "X")
    for path in ("/ui", "/ui/static/console.js", "/ui/api/adapters"):
        response = httpx.get(f"{console}{path}", headers=auth)
        assert response.status_code == 200
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and response.headers["x-frame-options"] == "DENY"
    page = httpx.get(f"{console}/ui").text
    assert "<script>" not in page and "style=" not in page  # no inline code for the CSP
    for path in ("/ui/static/../console.py", "/ui/static/%2e%2e%2fconsole.py", "/ui/static/x"):
        assert httpx.get(f"{console}{path}").status_code == 404
    info = httpx.get(f"{console}/ui/api/info", headers=auth).json()
    assert info == {
        "mode": "registry",
        "base": "tiny",
        "playground": False,
        "traffic": False,
        "keys": True,
    }


def test_without_keys_only_loopback_hosts_are_answered(filled):
    url, _, _ = filled
    process = ConsoleProcess(["--registry", url, "--port", "0"])
    try:
        base = process.wait_url()
        assert httpx.get(f"{base}/ui/api/adapters").status_code == 200
        rebound = httpx.get(f"{base}/ui/api/adapters", headers={"Host": "evil.example:80"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden_host"
        assert httpx.get(f"{base}/ui", headers={"Host": "evil.example"}).status_code == 403
    finally:
        process.stop()


def test_off_loopback_needs_keys(filled):
    url, _, _ = filled
    result = CliRunner().invoke(cli, ["hub", "ui", "--registry", url, "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "--api-keys" in result.output and "Traceback" not in result.output
