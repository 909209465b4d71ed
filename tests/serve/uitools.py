"""Helpers for the web console's tests: a real headless browser, pages opened with a key.

The browser is Debian's chromium (``/usr/bin/chromium``, or ``$LORABAY_CHROMIUM``) driven
by playwright's Python package, which cannot download browsers of its own here. Every
page is opened in a fresh context (its own session storage: a key typed in one never
reaches another) and every response it received is kept, so a test can check that
nothing it may not see reached the browser at all.

``LORABAY_SCREENSHOTS=DIR`` makes the tests save a screenshot of each page in DIR (the
README's images: ``LORABAY_SCREENSHOTS=docs/console pytest tests/serve/test_ui*.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LORABAY_CHROMIUM", "/usr/bin/chromium")
# Flags that work on these machines (no GPU, no network but loopback, run as root).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000


def start_browser():
    """(playwright, browser); fails in one line naming the fix when chromium is missing."""
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        pytest.fail(
            f"no chromium at {CHROMIUM}: run `make setup` (apt-get install chromium) "
            "or set LORABAY_CHROMIUM",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    manager = sync_playwright().start()
    try:
        # playwright gives the browser a fresh, empty profile (--user-data-dir) of its own.
        browser = manager.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    except BaseException:
        manager.stop()
        raise
    return manager, browser


@contextlib.contextmanager
def running_browser():
    """A headless chromium for a test module, always closed."""
    manager, browser = start_browser()
    try:
        yield browser
    finally:
        browser.close()
        manager.stop()


@contextlib.contextmanager
def page_opener(browser, url: str):
    """``open_(key)`` -> a ConsolePage signed in with ``key``; each is closed at the end, and
    none may have seen an uncaught error or a console error the test did not expect."""
    pages: list[ConsolePage] = []

    def open_(key: str | None) -> ConsolePage:
        pages.append(ConsolePage(browser, url, key))
        return pages[-1]

    try:
        yield open_
    finally:
        errors = [error for page in pages for error in page.errors]
        for page in pages:
            page.close()
        assert not errors, errors


def hub_list(registry_url: str, key: str, *extra: str) -> list[dict]:
    """What `lorabay hub list --json` prints, cut to the names ``key`` may use."""
    from click.testing import CliRunner

    from lorabay.cli.main import cli

    result = CliRunner().invoke(cli, ["hub", "list", "--json", "--registry", registry_url, *extra])
    assert result.exit_code == 0, result.output
    patterns = KEYS[key]
    return [
        r
        for r in json.loads(result.output)
        if any(fnmatch.fnmatchcase(r["name"], p) for p in patterns)
    ]


def shown_rows(page: ConsolePage) -> list[dict]:
    return page.page.eval_on_selector_all(
        "#adapters tbody tr",
        """rows => rows.map(tr => ({
            ref: tr.dataset.ref,
            cells: [...tr.cells].map(td => td.textContent),
            aliases: [...tr.cells[2].querySelectorAll('.badge')].map(b => b.textContent),
        }))""",
    )


class ConsolePage:
    """One tab on the console, signed in with ``key``; ``responses`` are all it fetched."""

    def __init__(self, browser, url: str, key: str | None):
        self.context = browser.new_context(viewport={"width": 1360, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.url = url.rstrip("/")
        self.responses = []
        self.errors: list[str] = []  # uncaught exceptions and console errors in the page
        self.page.on("response", lambda response: self.responses.append(response))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on(
            "console",
            lambda message: self.errors.append(message.text) if message.type == "error" else None,
        )
        self.page.goto(f"{self.url}/ui")
        if key is not None:
            self.sign_in(key)

    def sign_in(self, key: str) -> None:
        self.page.wait_for_selector("#key-form")
        self.page.fill("#key", key)
        self.page.click("#use-key")
        self.wait_loaded("adapters")

    def open(self, fragment: str, loaded: str) -> None:
        self.page.evaluate("fragment => { location.hash = fragment }", fragment)
        self.wait_loaded(loaded)

    def wait_loaded(self, what: str) -> None:
        self.page.wait_for_selector(f'main[data-loaded="{what}"]')

    def texts(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.textContent)")

    def received(self) -> str:
        """Everything the page received: the HTML it holds now and every response body."""
        bodies = [self.page.content()]
        for response in self.responses:
            try:
                bodies.append(response.text())
            except Exception:  # a redirect or an aborted stream has no body to read
                continue
        return "\n".join(bodies)

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("LORABAY_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


# -- the registry every console test reads ------------------------------------------------

ADMIN_KEY = "sk-admin-0000"
TEAM_A_KEY = "sk-team-a-0000"
TEAM_B_KEY = "sk-team-b-0000"
KEYS = {ADMIN_KEY: ["*"], TEAM_A_KEY: ["team-a/*"], TEAM_B_KEY: ["team-b/*"]}
# A description that would run if the page ever parsed data as HTML.
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> sums up'
CURVE = [
    {"step": s, "epoch": s / 40, "loss": round(3.0 / (1 + s / 10), 4)} for s in range(5, 45, 5)
]


def write_keys(path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"keys": KEYS}))
    return path


def fill_registry(registry, tiny_base: Path, make_lora, scratch: Path) -> dict:
    """Two tenants' adapters, with a lineage chain, label provenance, a training curve,
    aliases, a yank, one that does not fit (rank 32 over --max-lora-rank 16) and a judge.
    Returns name -> manifest of what the tests look at."""
    import json

    made = {}
    first = registry.push(
        make_lora(seed=31),
        "team-a/summarize",
        base=tiny_base,
        aliases=["prod"],
        description=HOSTILE,
        labels={"task": "summaries"},
    ).manifest
    judge = registry.push(
        make_lora(seed=35), "team-b/judge", base=tiny_base, kind="reward", description="grades"
    ).manifest
    trained = scratch / "trained"
    shutil.copytree(make_lora(seed=32), trained)
    (trained / "trainer_state.json").write_text(json.dumps({"log_history": CURVE}))
    second = registry.push(
        trained,
        "team-a/summarize",
        base=tiny_base,
        aliases=["canary"],
        labels={"task": "summaries"},
        lineage={
            "method": "sft",
            "parent_digest": first.digest,
            "dataset_digest": "sha256:" + "d" * 64,
            "hyperparameters": {"lr": 0.0002, "r": 8, "epochs": 2, "judge": judge.ref},
            "metrics": {"loss": 1.23, "eval_accuracy": 0.91},
            "dataset_provenance": {
                "made_by": "lorabay label --mode dpo",
                "judge": f"{judge.ref}@{judge.digest}",
                "policy": f"{first.ref}@{first.digest}",
                "constitution": "be brief",
                "records": 40,
            },
        },
    ).manifest
    child = registry.push(
        make_lora(seed=33),
        "team-a/summarize-dpo",
        base=tiny_base,
        lineage={"method": "dpo", "parent_digest": second.digest},
    ).manifest
    registry.push(make_lora(seed=34), "team-a/old", base=tiny_base)
    registry.yank("team-a/old:1", reason="superseded")
    registry.push(make_lora(seed=36, r=32), "team-a/wide", base=tiny_base)
    registry.push(
        make_lora(seed=37), "team-b/classify", base=tiny_base, labels={"task": "classify"}
    )
    made.update(first=first, second=second, child=child, judge=judge)
    return made
