"""Comments and docs that name a file or a module name one that exists.

Code moves (trainer/step.py became trainer/loop/step.py); a comment or a doc that still points
at the old place sends a reader to nothing. This reads every text file of the project for
paths like `trainer/loop/step.py` and dotted names like `trainer.state.checkpoints.BEST_METRICS`
and checks each against the tree: the file exists, the module exists, and the first name after
the module is defined in it.
"""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.quick

PACKAGES = ("trainer", "data", "models", "bench", "tests")
TEXT_SUFFIXES = (".py", ".md", ".cfg", ".sh", ".yaml", ".ipynb", ".toml")
# A path below one of the project's folders, ending in a file name with an extension; names in
# capitals are placeholders (configs/NAME.cfg).
PATH = re.compile(r"(?<![\w./-])((?:trainer|data|models|bench|tests|configs|docs|notebooks)"
                  r"/[\w/.-]*\w\.(?:py|md|cfg|yaml|ipynb))")
# A dotted name starting at a package: trainer.x.y. `data` is also a common variable name
# (data.train), so data.* counts only where it is plainly a module: after `python -m`,
# `import`, `from` or inside backticks.
DOTTED = re.compile(r"(?<![\w./])((?:trainer|models|bench)(?:\.[A-Za-z_]\w*)+)")
DATA_MODULE = re.compile(r"(?:-m |import |from |`)(data(?:\.[A-Za-z_]\w*)+)")
# A module by path and a name in it: trainer/state/checkpoints.BEST_METRICS.
PATH_AND_NAME = re.compile(r"(?<![\w./-])((?:trainer|data|models|bench)/[\w/]+)\.([A-Za-z_]\w*)")
EXTENSIONS = {"py", "md", "cfg", "json", "txt", "tsv", "keras", "yaml", "ipynb", "toml", "jsonl",
              "sh", "pb", "index", "png", "jpg", "tfrecord", "csv", "log", "lock"}
# Tests whose examples name modules that do not exist, on purpose.
STALE_ON_PURPOSE = {"test_references.py", "test_structure.py"}
DEFINES = r"^\s*(?:def|class)\s+{0}\b|^\s*{0}\s*[:=]|^\s*(?:from|import)\b.*\b{0}\b"


def _project_files() -> list[Path]:
    skip = {".git", ".venv", "dataset", "runs", "build", "test-artifacts", "__pycache__"}
    return [p for p in REPO.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
            and not skip & set(p.relative_to(REPO).parts)
            and p.name not in STALE_ON_PURPOSE]


def _module_file(parts: list[str]) -> tuple[Path | None, list[str]]:
    """The longest prefix of `parts` that is a module of the tree, and the names after it."""
    for i in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:i])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[i:]
    return None, parts


def _broken_dotted(name: str) -> bool:
    if re.search(r"\.(py|md|cfg|json|txt|tsv|keras|yaml)$", name):
        return False  # a file name, checked as a path
    module, rest = _module_file(name.split("."))
    if module is None:
        return True
    if not rest:
        return False
    return not re.search(DEFINES.format(re.escape(rest[0])), module.read_text(), re.M)


def _prose(path: Path) -> str:
    """The text a reader reads: for Python, its comments and strings (in code, `trainer.x` is
    as likely an attribute of a variable named trainer); other files whole."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return text
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return "\n".join(token.string for token in tokens
                     if token.type in (tokenize.COMMENT, tokenize.STRING))


def broken_references(files: list[Path]) -> list[str]:
    broken = []
    for path in files:
        text = _prose(path)
        where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        for match in PATH.finditer(text):
            target = match.group(1)
            if re.search(r"/[A-Z_]+\.\w+$", target):
                continue  # a placeholder
            if not (REPO / target).exists() and not (path.parent / target).exists():
                broken.append(f"{where}: {target}")
        for match in PATH_AND_NAME.finditer(text):
            module, name = match.groups()
            if name not in EXTENSIONS and _broken_dotted(f"{module.replace('/', '.')}.{name}"):
                broken.append(f"{where}: {module}.{name}")
        dotted = [m.group(1) for m in DOTTED.finditer(text)]
        dotted += [m.group(1) for m in DATA_MODULE.finditer(text)]
        broken += [f"{where}: {name}" for name in sorted(set(dotted)) if _broken_dotted(name)]
    return broken


def test_every_named_file_and_module_exists():
    assert broken_references(_project_files()) == []


def test_a_moved_module_is_found(tmp_path):
    """The check itself: a stale path and a stale dotted name are both reported."""
    stale = tmp_path / "probe.md"
    stale.write_text("see trainer/step.py, trainer.ema.WeightAverage and "
                     "trainer/state/checkpoints.NO_SUCH_NAME; trainer/loop/step.py, "
                     "trainer.loop.ema.WeightAverage and trainer/config.BEST_METRICS are fine\n")
    assert broken_references([stale]) == [
        "probe.md: trainer/step.py",
        "probe.md: trainer/state/checkpoints.NO_SUCH_NAME",
        "probe.md: trainer.ema.WeightAverage"]
