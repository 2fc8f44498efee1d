"""Regenerate the config defaults in pyproject.toml and the README's config table from
common/config.py (the one source of truth); tests/test_config.py checks they agree.

    python scripts/sync_config_docs.py
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import config_fields  # noqa: E402


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def main() -> None:
    pyproject = ROOT / "pyproject.toml"
    text = pyproject.read_text()
    head = text[:text.index("[tool.flwr.app.config]")]
    body = "\n".join(f"{key} = {toml_value(default)}" for key, default, _ in config_fields())
    pyproject.write_text(head + "[tool.flwr.app.config]\n" + body + "\n")

    readme = ROOT / "README.md"
    text = readme.read_text()
    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default!r}` | {help_text} |" for key, default, help_text in config_fields()]
    start = text.index("| key | default | what it does |")
    end = text.index("\n\n", start)
    readme.write_text(text[:start] + "\n".join(rows) + text[end:])


if __name__ == "__main__":
    main()
