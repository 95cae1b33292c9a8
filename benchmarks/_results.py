"""Writes a benchmark's results: OUTPUT.json (settings and rows) and OUTPUT.md
(the command that produced it, and the table)."""

import json
import pathlib
import sys


def write_results(output, script, argv, data, table):
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(data, indent=1))
    arguments = " ".join(sys.argv[1:] if argv is None else argv)
    output.with_suffix(".md").write_text(
        f"Command: `python benchmarks/{script} {arguments}`\n\n{table}\n"
    )
    print(table)


def markdown_table(title, header, rows):
    """`title`, then a Markdown table: `header` the column names, `rows`
    lists of cells (strings)."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
