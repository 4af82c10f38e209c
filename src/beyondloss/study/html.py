"""Self-contained HTML next to every markdown report: one file to open, mail or archive.

:func:`write_html` renders a report's markdown (CommonMark with GitHub tables, by
``markdown-it-py``) into one HTML page whose images are embedded as ``data:`` URIs, so the page
needs none of the files beside it; links to other reports' ``.md`` files point to their
``.html`` twins.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

from beyondloss.study.report import replacing

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 80rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #1f2328; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f6f8fa; padding: 0.1rem 0.3rem; border-radius: 4px; font-size: 0.85rem; }
img { max-width: 100%; }
"""

_IMAGE = re.compile(r'<img src="([^":]+\.png)"')
_LOCAL_LINK = re.compile(r'href="([^":]+)\.md"')


def render_html(markdown: str, directory: Path, title: str) -> str:
    """The page of ``markdown``, whose relative ``.png`` images are read from ``directory``
    and embedded (an image that does not exist stays a link)."""
    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def embed(match: re.Match[str]) -> str:
        image = directory / match.group(1)
        if not image.is_file():
            return match.group(0)
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}"'

    body = _IMAGE.sub(embed, body)
    body = _LOCAL_LINK.sub(lambda match: f'href="{match.group(1)}.html"', body)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def write_html(markdown_path: Path, title: str) -> Path:
    """Write ``<name>.html`` beside ``markdown_path`` (atomically) and return its path."""
    target = markdown_path.with_suffix(".html")
    page = render_html(markdown_path.read_text(), markdown_path.parent, title)
    with replacing(target) as path:
        path.write_text(page)
    return target


def write_report(directory: Path, markdown: str, title: str, name: str = "report") -> Path:
    """``directory/<name>.md`` holding ``markdown`` and its self-contained ``<name>.html``, each
    written atomically: the one writer of every study's report and of the suite's summary.
    Returns the markdown's path."""
    target = directory / f"{name}.md"
    with replacing(target) as path:
        path.write_text(markdown + "\n")
    write_html(target, title)
    return target
