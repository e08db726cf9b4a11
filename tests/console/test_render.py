"""Safe rendering: HTML, images and LaTeX in user or model text never become markup; code keeps
its exact text; attachments are inlined in a fence their content cannot close."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from console import attachments
from console.render import code_fence, safe_markdown
from tests.support import REPO_ROOT


def test_html_is_neutralized() -> None:
    text = 'Hi <img src=x onerror="alert(1)"> and <script>alert(2)</script>!'
    out = safe_markdown(text)
    assert "<" not in out.replace("\\<", "")
    assert out == 'Hi \\<img src=x onerror="alert(1)"> and \\<script>alert(2)\\</script>!'


def test_images_become_links_and_dollars_stay_dollars() -> None:
    out = safe_markdown("![pixel](https://evil.example/p.png?d=secret) costs $5 or $10")
    assert out == "\\![pixel](https://evil.example/p.png?d=secret) costs \\$5 or \\$10"


def test_code_is_left_exactly_as_written() -> None:
    text = "Use `a<b && $x` here:\n\n```html\n<b>$1</b> \\n\n```\n\nthen <i>done</i>"
    out = safe_markdown(text)
    assert "`a<b && $x`" in out
    assert "```html\n<b>$1</b> \\n\n```" in out
    assert out.endswith("then \\<i>done\\</i>")


def test_backslashes_cannot_undo_the_escaping() -> None:
    # An author's backslash before "<" would otherwise turn our escape into a literal "\".
    assert safe_markdown("\\<script>") == "\\\\\\<script>"


def test_unclosed_fence_keeps_the_rest_as_code() -> None:
    assert safe_markdown("```\n<b>") == "```\n<b>"


def test_fence_outlasts_backticks_inside() -> None:
    assert code_fence("no ticks") == "```"
    assert code_fence("has ```` four") == "`````"


class Upload:
    def __init__(self, name: str, data: bytes, mime: str | None) -> None:
        self.name, self.type, self._data = name, mime, data

    def getvalue(self) -> bytes:
        return self._data


def test_attachments_text_inline_images_apart_binary_refused() -> None:
    out = attachments.build(
        "Look",
        [
            Upload("a.py", b"print('```')", "text/x-python"),
            Upload("p.png", b"\x89PNG", "image/png"),
            Upload("blob.bin", b"\xff\xfe\x00", None),
        ],
    )
    assert out.content == "Look\n\nAttached file `a.py`:\n\n````py\nprint('```')\n````"
    assert out.attachments == [
        {"type": "image", "name": "p.png", "media_type": "image/png", "data": "iVBORw=="}
    ]
    assert out.problems == ["blob.bin is not a text file and was not attached."]


def test_no_page_renders_text_as_html() -> None:
    # The rule of issue 7 §8, kept by a scan: nothing in the console passes
    # unsafe_allow_html, and no page calls st.html.
    sources = [REPO_ROOT / "app.py", *Path(REPO_ROOT / "views").glob("*.py")]
    sources += Path(REPO_ROOT / "console").glob("*.py")
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword):
                assert node.arg != "unsafe_allow_html", path
            if isinstance(node, ast.Attribute):
                assert node.attr != "html", path
    assert re.search(r"st\.markdown\(safe_markdown", (REPO_ROOT / "console/render.py").read_text())


def test_no_pages_folder_beside_the_entry_script() -> None:
    # Streamlit runs a `pages/` folder beside app.py as an old-style multipage app until a run
    # calls st.navigation: a first request for /admin after a start would skip sign-in and
    # roles. The console's pages live in views/.
    assert not (REPO_ROOT / "pages").exists()
    assert (REPO_ROOT / "views" / "admin.py").exists()
