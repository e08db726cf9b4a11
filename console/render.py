"""Safe rendering of message text and parts (issue 7 §8).

User and model text is Markdown with HTML disabled: `st.markdown` without `unsafe_allow_html`
already shows raw HTML as text, and `safe_markdown` neutralizes it once more before Streamlit sees
it, so `<img src=x onerror=...>` and `<script>` can only ever appear as literal text. It also
turns Markdown images into plain links (an image URL in model output would be fetched by every
viewer's browser: a way to leak data) and escapes `$`, which Streamlit would take for LaTeX.
Code spans and fenced code blocks are left exactly as written.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import streamlit as st

from console.stream import Message

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.DOTALL)
CURSOR = " ▌"


def _escape_prose(text: str) -> str:
    text = text.replace("\\", "\\\\")
    text = text.replace("<", "\\<").replace("$", "\\$")
    return text.replace("![", "\\![")


def _escape_inline(text: str) -> str:
    """Escape prose, keeping inline code spans verbatim."""
    out: list[str] = []
    last = 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_escape_prose(text[last : match.start()]))
        out.append(match.group(0))
        last = match.end()
    out.append(_escape_prose(text[last:]))
    return "".join(out)


def safe_markdown(text: str) -> str:
    """Markdown that renders as the author wrote it but cannot carry HTML, images or LaTeX."""
    lines = text.split("\n")
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in lines:
        if fence is None:
            opened = _FENCE.match(line)
            if opened:
                if prose:
                    out.append(_escape_inline("\n".join(prose)))
                prose = []
                fence = opened.group(1)
                out.append(line)
            else:
                prose.append(line)
        else:
            out.append(line)
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                fence = None
    if prose:
        out.append(_escape_inline("\n".join(prose)))
    return "\n".join(out)


def code_fence(text: str) -> str:
    """A backtick fence longer than any run of backticks inside `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def usd(value: Decimal | float | str | None, places: int = 4) -> str:
    if value is None:
        return "—"
    amount = Decimal(str(value))
    return f"${amount:,.{places}f}"


def price_label(
    display_name: str, input_price: Decimal | None, output_price: Decimal | None
) -> str:
    if input_price is None or output_price is None:
        return display_name
    return f"{display_name} · ${input_price:g} in / ${output_price:g} out per MTok"


# ---------------------------------------------------------------------------------- Streamlit


ApprovalHandler = Callable[[str, bool], None]


def markdown(text: str) -> None:
    st.markdown(safe_markdown(text))  # never unsafe_allow_html: user and model text


def message(
    m: Message,
    *,
    live: bool = False,
    key: str = "",
    on_approval: ApprovalHandler | None = None,
    actions: Callable[[Message], None] | None = None,
) -> None:
    """One message in a chat bubble: text, thinking, tool calls, approvals, its end state."""
    with st.chat_message(m.role):
        parts(m, live=live, key=key, on_approval=on_approval)
        if actions is not None:
            actions(m)


def parts(
    m: Message, *, live: bool = False, key: str = "", on_approval: ApprovalHandler | None = None
) -> None:
    streaming = live and m.status == "streaming"
    text_parts = [i for i, p in enumerate(m.parts) if p.get("type") == "text"]
    last_text = text_parts[-1] if text_parts else None
    for index, part in enumerate(m.parts):
        kind = part.get("type")
        if kind == "text":
            content = str(part.get("content") or "")
            if m.role == "user":
                markdown(content)
            else:
                cursor = streaming and index == last_text and index == len(m.parts) - 1
                st.markdown(safe_markdown(content) + (CURSOR if cursor else ""))
        elif kind == "thinking":
            thinking_now = streaming and index == len(m.parts) - 1
            with st.expander(
                "Thinking…" if thinking_now else "Thinking",
                expanded=False,
                icon=":material/psychology:",
            ):
                markdown(str(part.get("content") or ""))
        elif kind == "tool-call":
            _tool_call(m, part, key=key, on_approval=on_approval if streaming else None)
        elif kind == "image":
            _image(part)
        elif kind == "tool-result":
            continue  # shown inside its tool call
    if streaming and not m.parts:
        st.markdown("_Thinking…_")
    _end_state(m)


def _image(part: dict[str, Any]) -> None:
    """An attached image, drawn from its bytes (st.image; never HTML)."""
    name = str(part.get("name") or "image")
    try:
        data = base64.b64decode(str(part.get("data") or ""), validate=True)
    except ValueError:
        st.caption(f"(attachment {name} could not be shown)")
        return
    st.image(data, caption=name, width=320)


def _tool_call(
    m: Message, part: dict[str, Any], *, key: str, on_approval: ApprovalHandler | None
) -> None:
    name = str(part.get("name") or "tool")
    state = str(part.get("state") or "")
    approval = part.get("approval") or {}
    if state == "approval-requested":
        label = f"{name} · waiting for your approval"
    elif approval.get("approved") is False:
        label = f"{name} · denied"
    elif "output" in part:
        label = f"{name} · done"
    else:
        label = f"{name} · running"
    with st.expander(label, expanded=state == "approval-requested", icon=":material/build:"):
        arguments = str(part.get("arguments") or "")
        try:
            pretty = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
        except ValueError:
            pretty = arguments
        st.caption("Input")
        st.code(pretty or "{}", language="json")
        if "output" in part:
            st.caption("Output")
            st.code(str(part["output"]), language=None)
    call_id = str(part.get("id") or "")
    if state == "approval-requested" and on_approval is not None and call_id:
        st.info(f"Claude wants to run **{name}**. Allow it?")
        approve, deny, _ = st.columns([1, 1, 4])
        approve.button(
            "Approve",
            key=f"{key}approve-{call_id}",
            type="primary",
            on_click=on_approval,
            args=(call_id, True),
        )
        deny.button("Deny", key=f"{key}deny-{call_id}", on_click=on_approval, args=(call_id, False))


def _end_state(m: Message) -> None:
    if m.status == "error":
        error = m.error or {}
        detail = str(error.get("message") or "The answer failed.")
        code = error.get("code")
        st.error(f"{detail} ({code})" if code else detail)
    elif m.status == "interrupted":
        st.warning(str((m.error or {}).get("message") or "The answer was interrupted."))
    elif m.status == "stopped":
        reason = "the session's budget ran out" if m.finish_reason == "budget" else "stopped"
        st.caption(f"Answer ended early: {reason}.")
    elif m.finish_reason == "length":
        st.caption("Answer cut at the output token limit.")
