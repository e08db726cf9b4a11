"""Screenshots of every console page for the README (docs/screenshots/), taken with Debian's
Chromium through Playwright against a real service on its simulator, seeded with a little data.

    .venv/bin/python scripts/console_screenshots.py
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.console.support import CHROMIUM_ARGS, ConsoleProcess
from tests.support import REPO_ROOT, ServerProcess

OUT = REPO_ROOT / "docs" / "screenshots"


def wait_idle(api: httpx.Client, session_id: str) -> None:
    deadline = time.monotonic() + 60
    while api.get(f"/v1/sessions/{session_id}").json()["active_generation_id"] is not None:
        if time.monotonic() > deadline:
            raise SystemExit("a seeded generation did not finish")
        time.sleep(0.1)


def seed(api: httpx.Client) -> None:
    prompts = [
        ("Quarterly plan", "Draft three goals for the platform team this quarter [[tokens:80]]"),
        ("Incident notes", "Summarize the incident timeline in five bullets [[tokens:60]]"),
        ("SQL help", "How do I find duplicate emails in Postgres? [[tokens:50]]"),
        ("Broken request", "This one fails upstream [[fault:invalid_request]]"),
    ]
    for title, prompt in prompts:
        session_id = api.post("/v1/sessions", json={"title": title}).json()["id"]
        api.post(f"/v1/sessions/{session_id}/messages", json={"content": prompt})
        wait_idle(api, session_id)
    busy = api.post("/v1/sessions", json={"title": "Busy session"}).json()["id"]
    for n in range(3):
        api.post(f"/v1/sessions/{busy}/messages", json={"content": f"Message {n} [[tokens:5]]"})
        wait_idle(api, busy)
    api.post("/v1/users", json={"email": "ops@example.com", "role": "ops", "name": "Ops"})
    api.post("/v1/users", json={"email": "dana@example.com", "role": "member", "name": "Dana"})


def shoot(page: Page, name: str, height: int = 900) -> None:
    # Streamlit scrolls inside its own container, so a taller viewport is a taller picture.
    page.set_viewport_size({"width": 1400, "height": height})
    page.mouse.move(1, 1)
    page.wait_for_timeout(1200)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
    print("wrote", OUT / f"{name}.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Two messages a minute per session, so the seed's third message shows a rejection.
        env = {
            "SIMULATOR_TTFT_MS": "100",
            "SIMULATOR_TOKENS_PER_S": "400",
            "RATE_LIMIT_MESSAGES": "2/minute",
        }
        with ServerProcess(f"sqlite:///{root / 'db.sqlite'}", root, "service", **env) as service:
            api = httpx.Client(base_url=service.base_url, timeout=30)
            seed(api)
            with ConsoleProcess(service.base_url, root) as console, sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(console.url + "/")
                box = page.get_by_placeholder("Message Claude")
                box.fill(
                    "What did we say about the incident? "
                    '[[tool:search_my_history {"query": "incident"}]] [[tokens:40]]'
                )
                box.press("Enter")
                expect(page.get_by_role("button", name="Approve")).to_be_visible(timeout=30_000)
                shoot(page, "chat-approval")
                page.get_by_role("button", name="Approve").click()
                expect(page.get_by_role("button", name="Regenerate")).to_be_visible(timeout=30_000)
                shoot(page, "chat")
                page.goto(console.url + "/history")
                expect(page.get_by_text("Select a row")).to_be_visible()
                grid = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
                assert grid is not None
                page.mouse.click(grid["x"] + 18, grid["y"] + 35 + 17)
                expect(page.get_by_role("button", name="Rename")).to_be_visible()
                shoot(page, "history", 1100)
                for path, name, heading, height in (
                    ("/usage", "usage", "Cost per day by model", 1750),
                    ("/limits", "limits", "Upstream headroom", 1300),
                    ("/errors", "errors", "Errors over time by type", 1100),
                    ("/admin", "admin", "Change a user", 1000),
                ):
                    page.set_viewport_size({"width": 1400, "height": 900})
                    page.goto(console.url + path)
                    expect(page.get_by_text(re.compile(heading))).to_be_visible(timeout=30_000)
                    shoot(page, name, height)
                browser.close()


if __name__ == "__main__":
    main()
