"""A report section written in markdown (``##`` heading, paragraphs, pipe tables) as HTML.

Sections that are produced as markdown first (the corrections of a retrain round) appear in both the
markdown and the HTML report from one text; this is the small subset of markdown they use.
"""

from __future__ import annotations

import html


def markdown_section_html(md: str) -> str:
    """A section written in markdown (a ``##`` heading, paragraphs, pipe tables) as HTML."""
    esc = html.escape
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{esc(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{esc(line)}</p>")
    flush()
    return "\n".join(out)
