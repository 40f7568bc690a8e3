"""docs/experiments/README.md indexes every entry of the experiment history, so that a dated figure can be found
from the index without reading every file."""
from __future__ import annotations

import re
from pathlib import Path

HISTORY = Path(__file__).resolve().parents[1] / "docs" / "experiments"


def test_the_experiment_index_names_every_file_and_every_entry() -> None:
    index = (HISTORY / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"^- \[([\w.-]+\.md)\]\(\1\)", index, flags=re.M))
    assert linked == {p.name for p in HISTORY.glob("*.md")} - {"README.md"}
    bullets = {line.strip()[2:] for line in index.splitlines() if line.startswith("  ") and line.strip().startswith("- ")}
    for name in sorted(linked):
        headings = re.findall(r"^#{2,3} (.+?)\s*$", (HISTORY / name).read_text(encoding="utf-8"), flags=re.M)
        missing = [h for h in headings if h not in bullets]
        assert not missing, f"{name}: not in docs/experiments/README.md: {missing}"
