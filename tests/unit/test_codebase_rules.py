"""Rules of the codebase that a grep can keep (HELPERS.md / STYLE.md): one home per idea, no history,
every command option explained.

Constants with one definition (REQUEUE_EXIT_CODE, IMAGENET_MEAN) are checked in
test_launchers.py; the import layers in test_layers.py.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = ("seerlike", "sharding", "launchers", "benchmarks", "infra")
SUFFIXES = {".py", ".sh", ".txt", ".toml", ".yaml", ".yml"}

RENAMES = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|shutil\.move\(")
HISTORY = re.compile(r"\bsessions?[ _-]?\d|FACTS\.md|\bissues?[ _-]?#?\d", re.IGNORECASE)
TORCH_BRANCH = re.compile(r"torch\.__version__\s*[<>=!]|TorchVersion|version\.parse\(\s*torch|torch_version|"
                          r"hasattr\(torch[.,]")


def _code_files() -> list[Path]:
    files = [p for pkg in CODE for p in (ROOT / pkg).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return sorted(files + [ROOT / "pyproject.toml"])


def _hits(pattern: re.Pattern, files: list[Path]) -> list[str]:
    return [f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for p in files for text in [p.read_text(errors="replace")] for m in pattern.finditer(text)]


def test_files_are_replaced_only_through_storage_atomic_write():
    allowed = {
        # storage.atomic_write itself, and put_file's move of a finished file (a copy across filesystems
        # goes through atomic_write)
        "seerlike/storage.py",
        # a downloaded checkpoint *folder* becomes visible by one rename (atomic_write is for files)
        "seerlike/engine/checkpoint.py",
    }
    hits = _hits(RENAMES, [p for p in _code_files() if p.suffix == ".py"])
    assert [h for h in hits if h.split(":")[0] not in allowed] == []
    assert sum(h.startswith("seerlike/engine/checkpoint.py") for h in hits) == 1


def test_code_cites_docs_not_development_history():
    assert _hits(HISTORY, _code_files()) == []
    names = [p.relative_to(ROOT).as_posix() for p in _code_files() if HISTORY.search(p.name)]
    assert names == []


def test_every_cited_docs_section_exists():
    """``docs/X.md, "Title"`` in code names a heading of that page (the quote may wrap over comment lines)."""
    cite = re.compile(r'docs/([a-z_]+\.md),\s+"([^"]+)"')
    seen, missing = 0, []
    for p in _code_files():
        for m in cite.finditer(p.read_text(errors="replace")):
            seen += 1
            title = re.sub(r"\s+(#\s*)?", " ", m.group(2)).strip()
            headings = [h.lstrip("#").strip() for h in (ROOT / "docs" / m.group(1)).read_text().splitlines()
                        if h.startswith("#")]
            if not any(title in h for h in headings):
                missing.append(f"{p.relative_to(ROOT)}: docs/{m.group(1)}, {title!r}")
    assert missing == [] and seen >= 10


def test_no_branch_on_the_torch_version():
    """torch is pinned ==2.13.0 (pyproject.toml): code for other versions is dead."""
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert _hits(TORCH_BRANCH, [p for p in _code_files() if p.suffix == ".py"]) == []


def test_the_rules_see_what_they_forbid(tmp_path):
    """The patterns above match the forms they are meant to catch (a rule that cannot fail is no rule)."""
    sample = tmp_path / "x.py"
    sample.write_text('os.replace(tmp, path)\n# see Session 4 and FACTS.md, issue 20\nif torch.__version__ < "2.13":\n')
    assert len(_hits(RENAMES, [sample])) == 1 and len(_hits(TORCH_BRANCH, [sample])) == 1
    assert len(_hits(HISTORY, [sample])) == 3 and HISTORY.search("session4_swav.txt")


def test_every_option_of_every_command_says_what_it_does():
    import argparse
    import importlib

    from seerlike.cli import COMMANDS

    silent = []
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"seerlike {name}")
        importlib.import_module(module).add_arguments(parser)
        assert parser.format_help().startswith(f"usage: seerlike {name}")  # every %(default)s renders
        silent += [f"{name} {a.option_strings[-1] if a.option_strings else a.dest}" for a in parser._actions
                   if not a.help and not isinstance(a, argparse._HelpAction)]
    assert silent == []
