"""The web console a real `lorabay serve` mounts at /ui, in a real headless chromium.

One gateway (tiny base, float32, API keys, --max-lora-rank 16) serves the module; each
test opens its own browser context and signs in with a key. The playground's answers
are compared with the same requests sent to /v1 by a plain client, and the traffic page
with the scraper's /metrics. With ``LORABAY_SCREENSHOTS=DIR`` the tests save the
README's pictures of each page.
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from servetools import GatewayProcess, metric, tiny_serve_args
from uitools import (
    ADMIN_KEY,
    TEAM_A_KEY,
    TEAM_B_KEY,
    ConsolePage,
    fill_registry,
    hub_list,
    page_opener,
    running_browser,
    shown_rows,
    write_keys,
)

from lorabay.hub import Registry

pytestmark = [pytest.mark.vllm, pytest.mark.browser]

PROMPT = "Summarize: one base, many adapters."
MAX_TOKENS = 16
PICKED = ["team-a/summarize:1", "team-a/summarize:2", "tiny"]


@pytest.fixture(scope="module")
def served(tiny_base, make_lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("console-gateway")
    registry_url = f"file://{root / 'registry'}"
    fill_registry(Registry.open(registry_url), tiny_base, make_lora, root)
    keys = write_keys(root / "keys.yaml")
    gateway = GatewayProcess(
        [
            *tiny_serve_args(tiny_base, registry_url),
            *("--api-keys", str(keys), "--max-lora-rank", "16", "--max-loras", "3"),
        ],
        env={"LORABAY_HOME": str(root / "home")},
    )
    try:
        gateway.start()
        assert gateway.url, gateway.output
        yield gateway, registry_url
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.kill_leftovers()


@pytest.fixture(scope="module")
def browser():
    with running_browser() as browser:
        yield browser


@pytest.fixture
def open_page(browser, served):
    with page_opener(browser, served[0].url) as open_:
        yield open_


def chat(url: str, key: str, model: str, stream: bool = False) -> str:
    """The answer /v1 gives a plain client for the playground's request (its text)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", headers=headers, json=body, timeout=300
    ) as response:
        response.read()
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def run_playground(page: ConsolePage, models: list[str]) -> list[dict]:
    page.open("#/playground", "playground")
    for slot, model in enumerate(models):
        page.page.select_option(f"#model-{slot}", model)
    page.page.fill("#prompt", PROMPT)
    page.page.fill("#max-tokens", str(MAX_TOKENS))
    page.page.fill("#temperature", "0")
    page.page.click("#run")
    page.page.wait_for_selector('#panels[data-done="all"]')
    return page.page.eval_on_selector_all(
        "#panels .panel",
        """ps => ps.map(p => ({
            model: p.dataset.model, done: p.dataset.done,
            answer: p.querySelector('.answer').textContent,
            elements: p.querySelector('.answer').children.length,
            stats: p.querySelector('.stats').textContent,
        }))""",
    )


def test_adapters_list_is_hub_list_for_the_key(open_page, served):
    gateway, registry_url = served
    page = open_page(TEAM_A_KEY)
    rows = shown_rows(page)
    assert [r["ref"] for r in rows] == [r["ref"] for r in hub_list(registry_url, TEAM_A_KEY)]
    # the rank-32 adapter is listed, and said not to fit the served base
    fits = {r["ref"]: r["cells"][9] for r in rows}
    assert fits["team-a/wide:1"] == "no" and fits["team-a/summarize:2"] == "yes"
    page.screenshot("adapters")
    page.open("#/version/team-a%2Fwide%3A1", "version")
    assert "rank 32 is above the engine's --max-lora-rank 16" in page.texts("#fit li")
    page.open("#/version/team-a%2Fsummarize%3A2", "version")
    assert page.page.eval_on_selector_all("#lineage g.node", "n => n.length") == 5
    page.screenshot("version")
    assert "team-b" not in page.received()


def test_playground_answers_side_by_side_equal_the_api(open_page, served):
    gateway, _ = served
    page = open_page(TEAM_A_KEY)
    page.open("#/playground", "playground")
    # the models offered are /v1/models for the key: versions and aliases, never the
    # rank-32 adapter the engine cannot serve, nothing of team-b
    offered = page.page.eval_on_selector_all("#model-0 option", "os => os.map(o => o.value)")
    assert {"tiny", "team-a/summarize:1", "team-a/summarize:prod"} <= set(offered)
    assert "team-a/wide:1" not in offered and not any("team-b" in o for o in offered)
    panels = run_playground(page, PICKED)
    assert [p["model"] for p in panels] == PICKED
    for panel in panels:
        assert panel["done"] == "ok", panel
        assert panel["answer"] == chat(gateway.url, TEAM_A_KEY, panel["model"]), panel
        assert panel["elements"] == 0  # model output is text, never markup
        assert f"{MAX_TOKENS} tokens" in panel["stats"] and "tok/s" in panel["stats"]
    assert panels[0]["answer"] and panels[0]["answer"] != panels[1]["answer"]
    page.screenshot("playground")


def test_traffic_shows_the_keys_adapters_from_the_gateways_counters(open_page, served):
    gateway, _ = served
    chat(gateway.url, TEAM_B_KEY, "team-b/classify:1")  # another tenant's traffic
    page = open_page(TEAM_A_KEY)
    page.open("#/traffic", "traffic")

    def shown() -> dict:
        rows = page.page.eval_on_selector_all(
            "#traffic tbody tr",
            "rs => rs.map(r => [r.dataset.adapter, r.dataset.version, r.cells[2].textContent])",
        )
        return {(a, v): int(n) for a, v, n in rows}

    before = shown()
    assert all(adapter.startswith("team-a/") for adapter, _ in before)  # no base: all tenants'
    chat(gateway.url, TEAM_A_KEY, "team-a/summarize:1")
    key = ("team-a/summarize", "1")
    deadline = time.monotonic() + 60
    while shown().get(key, 0) != before.get(key, 0) + 1:  # the page refreshes by itself
        assert time.monotonic() < deadline, (before, shown())
        time.sleep(0.5)
    counted = metric(
        gateway.metrics(), "lorabay_requests_total", adapter="team-a/summarize", version="1"
    )
    assert shown()[key] == counted
    assert "team-b" not in page.received()
    charts = page.page.eval_on_selector_all(
        "#traffic-charts svg", "s => s.map(c => c.dataset.title)"
    )
    assert charts[:2] == ["requests/s", "tokens/s (generated)"] and len(charts) == 5
    # the same page for the admin key: every tenant, and the base
    admin = open_page(ADMIN_KEY)
    admin.open("#/traffic", "traffic")
    rows = admin.page.eval_on_selector_all(
        "#traffic tbody tr", "rs => rs.map(r => r.dataset.adapter)"
    )
    assert {"team-b/classify", "tiny"} <= set(rows)
    for _ in range(3):  # a few readings apart, so the charts draw rates
        for model in PICKED:
            chat(gateway.url, ADMIN_KEY, model, stream=True)  # streams: time to first token
        time.sleep(3.2)
    admin.page.wait_for_selector("#traffic-charts polyline")
    admin.screenshot("traffic")


def test_second_key_sees_only_its_own(open_page, served):
    gateway, registry_url = served
    page = open_page(TEAM_B_KEY)
    assert [r["ref"] for r in shown_rows(page)] == [
        r["ref"] for r in hub_list(registry_url, TEAM_B_KEY)
    ]
    page.open("#/playground", "playground")
    offered = page.page.eval_on_selector_all("#model-0 option", "os => os.map(o => o.value)")
    # the judge is not offered: kind reward, the engine does not serve it
    assert offered == ["", "tiny", "team-b/classify:1", "team-b/classify:latest"]
    page.open("#/traffic", "traffic")
    page.open("#/version/team-b%2Fclassify%3A1", "version")
    received = page.received()
    assert "team-a" not in received and "summarize" not in received
    api = httpx.get(
        f"{gateway.url}/ui/api/traffic", headers={"Authorization": f"Bearer {TEAM_B_KEY}"}
    ).json()
    assert {row["adapter"] for row in api["adapters"]} <= {"team-b/classify"}
    assert json.dumps(api).count("team-a") == 0
