"""End to end in Chromium (pytest-playwright): `streamlit run app.py` and `chatops serve` as real
processes. A streamed answer survives a reload mid-answer (whole, never doubled), a tool call is
approved from the page, HTML in messages stays text, History renames / deletes / restores, and
the dashboards draw the service's data."""

from __future__ import annotations

import re
import uuid

import httpx
from playwright.sync_api import Page, expect

from tests.console.conftest import chat, new_session, wait_idle

XSS = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script>'
# Visible text of an assistant bubble: its markdown, not what sits in expanders (thinking).
ANSWER_JS = """() => {
  const bubbles = [...document.querySelectorAll('[data-testid="stChatMessage"]')];
  const last = bubbles[bubbles.length - 1];
  if (!last) return "";
  return [...last.querySelectorAll('[data-testid="stMarkdownContainer"]')]
    .filter(el => !el.closest('[data-testid="stExpander"]') && !el.closest('button'))
    .map(el => el.innerText).join("");
}"""


def words(text: str) -> str:
    return " ".join(text.replace("▌", " ").split())


def session_from(page: Page) -> str:
    match = re.search(r"[?&]session=([0-9a-f-]{36})", page.url)
    assert match, page.url
    return match.group(1)


def send(page: Page, text: str) -> None:
    box = page.get_by_placeholder("Message Claude")
    box.fill(text)
    box.press("Enter")


def stored_answer(api: httpx.Client, session_id: str) -> str:
    body = wait_idle(api, session_id)
    last = body["messages"][-1]
    assert last["role"] == "assistant"
    return "".join(p["content"] for p in last["parts"] if p["type"] == "text")


def test_answer_streams_and_survives_a_reload(page: Page, console: str, api: httpx.Client) -> None:
    page.goto(console + "/")
    send(page, f"Tell me a story {XSS} [[tokens:300]]")
    page.wait_for_url(re.compile(r"session="))
    session_id = session_from(page)
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    # Some of the answer is on the page while it is still being written ...
    page.wait_for_function(f"({ANSWER_JS})().length > 20")
    partial = words(page.evaluate(ANSWER_JS))
    page.reload()
    # ... and after the reload the page shows it again and keeps following live.
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    page.wait_for_function(f"({ANSWER_JS})().length > {len(partial) // 2}")
    expect(page.get_by_role("button", name="Stop")).to_be_hidden(timeout=30_000)
    final = words(page.evaluate(ANSWER_JS))
    assert final == words(stored_answer(api, session_id))  # whole, not truncated, not doubled
    assert final.startswith(partial[: len(partial) // 2])
    # The HTML in the message is shown as text and never ran.
    user = page.locator('[data-testid="stChatMessage"]').first
    expect(user).to_contain_text('<img src=x onerror="window.__xss=1">')
    expect(user).to_contain_text("<script>window.__xss=2</script>")
    assert page.evaluate("window.__xss") is None
    assert page.locator('img[src="x"]').count() == 0


def test_tool_call_is_approved_from_the_page(page: Page, console: str, api: httpx.Client) -> None:
    page.goto(console + "/")
    send(page, '[[tool:search_my_history {"query": "story"}]] [[tokens:10]]')
    approve = page.get_by_role("button", name="Approve")
    expect(approve).to_be_visible(timeout=20_000)
    expect(page.get_by_text("waiting for your approval")).to_be_visible()
    approve.click()
    expect(page.get_by_text("search_my_history · done")).to_be_visible(timeout=20_000)
    expect(page.get_by_role("button", name="Stop")).to_be_hidden(timeout=20_000)
    session_id = session_from(page)
    call = next(
        p for p in wait_idle(api, session_id)["messages"][-1]["parts"] if p["type"] == "tool-call"
    )
    assert call["approval"]["approved"] is True
    assert "The tool returned" in words(page.evaluate(ANSWER_JS))


def click_first_row(page: Page) -> None:
    """st.dataframe draws on a canvas: click the first row's selection box."""
    grid = page.locator('[data-testid="stDataFrame"]').first
    expect(grid).to_be_visible()
    box = grid.bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)


def test_history_rename_delete_restore(page: Page, console: str, api: httpx.Client) -> None:
    word = f"wombat{uuid.uuid4().hex[:8]}"
    session_id = new_session(api)
    chat(api, session_id, f"Notes on {word} [[tokens:4]]")
    page.goto(console + "/history")
    search = page.get_by_placeholder("Words in titles and messages")
    search.fill(word)
    search.press("Enter")
    expect(page.get_by_text("1 session shown.")).to_be_visible()
    click_first_row(page)
    title = page.get_by_label("New title")
    expect(title).to_be_visible()
    title.fill(f"Renamed {word}")
    title.press("Enter")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_text(f"Renamed to “Renamed {word}”.")).to_be_visible()
    assert api.get(f"/v1/sessions/{session_id}").json()["title"] == f"Renamed {word}"

    click_first_row(page)
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("Moved to the trash")).to_be_visible()
    assert api.get(f"/v1/sessions/{session_id}").status_code == 404

    page.get_by_text("Trash", exact=True).click()
    expect(page.get_by_text("1 session shown.")).to_be_visible()
    click_first_row(page)
    page.get_by_role("button", name="Restore").click()
    expect(page.get_by_text("Restored.")).to_be_visible()
    assert api.get(f"/v1/sessions/{session_id}").status_code == 200


def test_dashboards_draw_the_service_data(page: Page, console: str, api: httpx.Client) -> None:
    chat(api, new_session(api), "Usage please [[tokens:5]]")
    chat(api, new_session(api), "Break [[fault:invalid_request]]")
    checks: list[tuple[str, int, str]] = [
        ("/usage", 4, "Cost per day by model"),
        ("/errors", 1, "Errors over time by type"),
        ("/limits", 0, "Upstream headroom (Anthropic)"),
    ]
    for path, charts, heading in checks:
        page.goto(console + path)
        expect(page.get_by_text(heading)).to_be_visible()
        if charts:
            expect(page.locator(".js-plotly-plot")).to_have_count(charts, timeout=20_000)
        assert page.locator('[data-testid="stException"]').count() == 0
    expect(page.get_by_text(re.compile(r"input tokens: [\d,]+ of [\d,]+ left"))).to_be_visible()
