"""Print the README's config table (every key, default and comment) from config/defaults.py.

    python -m config.table                  # print it
    python -m config.table --update-readme  # rewrite the table between the markers in README.md
"""
from __future__ import annotations

import os
import re

_LINE = re.compile(r"^_C\.([A-Z0-9_.]+) = (.+?)  # (.+)$")


def config_rows() -> list[tuple[str, str, str]]:
    """(key, default as written, comment) for every key in defaults.py, in file order."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults.py")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            match = _LINE.match(line.rstrip("\n"))
            if match:
                rows.append(match.groups())
    return rows


def markdown_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {comment.replace('|', '/')} |" for key, default, comment in config_rows()]
    return "\n".join(lines)


START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def readme_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_table(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def update_readme() -> None:
    with open(readme_path(), encoding="utf-8") as handle:
        text = handle.read()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(readme_path(), "w", encoding="utf-8") as handle:
        handle.write(f"{head}{START}\n{markdown_table()}\n{END}{tail}")


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:
        update_readme()
    else:
        print(markdown_table())
