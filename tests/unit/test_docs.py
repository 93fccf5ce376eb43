"""The docs name what exists: docs/architecture.md's files, docs/models.md's backbones."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# a path from the repository root: a known top folder, then folders and a file or a trailing /
PATH = re.compile(r"\b(?:seerlike|sharding|launchers|tests|docs|infra|benchmarks)/[\w./-]*")
# any file name ending in .py, rooted or not (a bare "engine/train.py" must not slip through)
PY_FILE = re.compile(r"(?<![\w/.])[\w/.-]+\.py\b")


def test_every_path_in_the_architecture_page_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = sorted({m.rstrip(".") for m in PATH.findall(text)})
    assert len(named) > 30  # the page names its files; a regex that matched nothing would prove nothing
    missing = [p for p in named if not (ROOT / p).exists()]
    assert missing == [], f"docs/architecture.md names files that do not exist: {missing}"
    unrooted = sorted({f for f in PY_FILE.findall(text) if not PATH.fullmatch(f)})
    assert unrooted == [], f"write these paths from the repository root: {unrooted}"


def test_the_page_names_the_loop_the_step_and_the_schema():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for path in ("seerlike/engine/loop.py", "seerlike/engine/step.py", "seerlike/engine/config.py",
                 "seerlike/commands/", "seerlike/methods/__init__.py"):
        assert path in text


def _expand(pattern: str) -> list[str]:
    """``regnet_{x,y}_{a,b}`` -> its four names (the table's shorthand)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [n for alt in m.group(1).split(",") for n in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def test_every_backbone_not_in_torchvision_is_described_in_the_models_page():
    from seerlike import models

    text = (ROOT / "docs" / "models.md").read_text()
    described = {n for cell in re.findall(r"`([\w{},]+)`", text) for n in _expand(cell)}
    ours = [n for n in models.names() if not models.source(n).startswith("torchvision")]
    assert len(ours) > 10
    assert sorted(set(ours) - described) == []
