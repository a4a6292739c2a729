"""The look of this project's HTML reports (``mantranet parity --report`` and ``mantranet evaluate --report``): one
style sheet and one page frame, so that both read alike."""

from __future__ import annotations

import html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.passed { color: #1a7f37; } .failed { color: #c00; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
tr.fail td { background: #fde8e8; }
.scroll { max-width: 100%; overflow-x: auto; }
code, .mono { font-family: ui-monospace, monospace; font-size: 0.9em; }
.note { color: #555; font-size: 0.85em; }
details { margin: 0.5em 0 1em; } summary { cursor: pointer; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; max-width: 640px; }
img { max-width: 100%; height: auto; }
"""


def escape(value: object) -> str:
    """``value`` as text that HTML shows as it is."""
    return html.escape(str(value))


def html_page(title: str, generator: str, body: str) -> str:
    """A whole report page: ``body`` (HTML) under the shared style.

    Args:
        title: the page title (escaped here).
        generator: the command that wrote it, for the page's metadata.
        body: the page's content, already HTML.

    Returns:
        The page, UTF-8 HTML text.
    """
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{escape(generator)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
{body}
</body></html>
"""
