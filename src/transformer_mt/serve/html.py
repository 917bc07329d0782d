"""The web page and the standalone attention file, built from the package's static files
(no CDN, nothing fetched at run time): the explorer's script and style are inlined."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def _static(name: str) -> str:
    return resources.files("transformer_mt.serve").joinpath("static", name).read_text("utf-8")


def _inline(html: str) -> str:
    return html.replace("/*CSS*/", _static("explorer.css")).replace(
        "/*EXPLORER*/", _static("explorer.js")
    )


def page() -> str:
    """The server's page at ``/``: translate, n-best alternatives, the attention explorer."""
    return _inline(_static("index.html"))


def standalone_html(items: list[dict[str, Any]], title: str = "attention") -> str:
    """One self-contained HTML file exploring the attention of ``items`` (each as
    ``/v1/attention`` returns it, with its input ``line`` number), with a selector between
    the sentences; opens offline."""
    # No "<", ">" or "&" inside the script element: nothing in the data can end it early.
    data = (
        json.dumps(items, ensure_ascii=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    options = "".join(  # numbered by input line where known (blank lines have no item)
        f'<option value="{i}">{item.get("line", i + 1)}. {_escape(item["translation"])}</option>'
        for i, item in enumerate(items)
    )
    return _inline(
        f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_escape(title)}</title>
<style>/*CSS*/</style></head>
<body>
<h1>{_escape(title)}</h1>
<p><select id="sentence">{options}</select></p>
<div id="explorer"></div>
<script>/*EXPLORER*/</script>
<script>
"use strict";
const ITEMS = {data};
const select = document.getElementById("sentence");
const root = document.getElementById("explorer");
const show = () => renderExplorer(root, ITEMS[Number(select.value)]);
select.addEventListener("change", show);
if (ITEMS.length) show(); else root.textContent = "no translated lines";
</script>
</body></html>
"""
    )


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
