"""``bench/RESULTS.md`` from ``bench-results.json``: a run's figures as Markdown.

Only the block between the two markers is written, so the profiles and notes kept by hand below it stay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Row

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
START = "<!-- bench-results: written by bin/bench from bench-results.json; edit below the end marker only -->"
END = "<!-- /bench-results -->"
TITLE = "# ztfd benchmark results\n\nWhat `bin/bench` measures, and how: `docs/performance.md`.\n"


def markdown(document: dict[str, Any]) -> str:
    """The figures of one ``bench-results.json`` document: the machine, the date, one table row per figure."""
    info, settings = document.get("machine", {}), document.get("settings", {})
    lines = [
        "## Latest results", "",
        f"`bin/bench` finished {document.get('finished_at', '(time unknown)')} on {info.get('cpu_count')} cores, "
        f"{info.get('memory_gb')} GB ({info.get('platform')}, Python {info.get('python')}); sections "
        f"{', '.join(settings.get('sections', []))}; medians of {settings.get('runs')} runs"
        f"{'; --quick: sizes reduced, figures not meaningful' if settings.get('quick') else ''}.", "",
        "| section | figure | value | compared with | goal | |",
        "|---|---|---|---|---|---|",
    ]
    for fields in document.get("rows", []):
        cells = Row(**fields).cells()
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    notes = document.get("notes", [])
    if notes:
        lines += ["", *(f"- note: {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write(document: dict[str, Any], path: Path = RESULTS_PATH) -> None:
    """Replace the block between the markers of ``path`` (create the file if it is missing), keep the rest."""
    block = f"{START}\n{markdown(document)}{END}"
    text = path.read_text() if path.exists() else f"{TITLE}\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{path} has no '{START}' ... '{END}' block to replace")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(before + block + after)
