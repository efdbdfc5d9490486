"""The house as docs/architecture.md draws it: the package tree as its table lists it, no
import from a floor above, no cycle (function-level imports included), lazy imports that say
why; and the docs a user walks: the README within its 250 lines, in its order, every relative
link to a file and heading that exist."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "blockft_jax"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def floors() -> list[tuple[str | None, list[str] | None]]:
    """The package tree's floors, bottom first: (package, its modules) from the table under
    '## The package tree'; the package None is the top level (the command line), the modules
    None a package read as one unit (`models/`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The package tree", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    out = []
    for row in rows:
        package = re.fullmatch(r"\s*`(\w+)/`\s*", row[1])
        names = re.findall(r"`(\w+)`", row[2])
        out.append((package.group(1) if package else None, names or None))
    return out


def units() -> dict[str, int]:
    """Every module as the import graph sees it ('engine.cohort', 'main', or 'models' for a
    package read as one unit), with its floor."""
    return {(f"{package}.{name}" if package and names else package or name): floor
            for floor, (package, names) in enumerate(floors())
            for name in (names or [None])}


def unit_files() -> dict[str, list[Path]]:
    """The files behind each unit, read from the package tree itself."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and parts[0] != "models":
            continue
        unit = "models" if parts[0] == "models" else ".".join(parts)
        found.setdefault(unit, []).append(path)
    return found


def imports(unit: str) -> set[str]:
    """The units that `unit` imports, anywhere in its files (function bodies included)."""
    known = set(units())
    found = set()
    for path in unit_files()[unit]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("blockft_jax") for a in node.names), path
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
                continue
            parts = node.module.split(".")
            if parts[0] != "blockft_jax":
                continue
            if len(parts) == 1:  # from blockft_jax import main, models
                found |= {a.name for a in node.names}
            elif ".".join(parts[1:3]) in known:  # from blockft_jax.engine.cohort import X
                found.add(".".join(parts[1:3]))
            elif parts[1] in known:  # from blockft_jax.models.layers import X
                found.add(parts[1])
            else:  # from blockft_jax.engine import cohort
                found |= {f"{parts[1]}.{a.name}" for a in node.names}
    return found - {unit}


def test_the_tree_is_the_map():
    placed, there = set(units()), set(unit_files())
    assert placed == there, (
        "docs/architecture.md's package tree and blockft_jax/ disagree: only in the docs "
        f"{sorted(placed - there)}, only in the package {sorted(there - placed)}")


def test_no_module_imports_one_on_a_floor_above():
    floor_of = units()
    edges = [(unit, other) for unit in floor_of for other in sorted(imports(unit))]
    unknown = [f"{unit} -> {other}" for unit, other in edges if other not in floor_of]
    assert not unknown, unknown
    upward = [f"{unit} -> {other}" for unit, other in edges if floor_of[other] > floor_of[unit]]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    graph = {unit: imports(unit) for unit in units()}
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_function_level_imports_say_why():
    """An import of the package inside a function carries a comment (on its line or the line
    above) saying why it is not at the top."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith(
                        "blockft_jax"):
                    above = inner.lineno - 2  # a comment above this import or its block
                    while lines[above].strip().startswith("from blockft_jax"):
                        above -= 1
                    if "#" not in lines[inner.lineno - 1] and not lines[above].strip(
                            ).startswith("#"):
                        silent.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not silent, silent


def test_the_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
    headings = [line for line in lines if line.startswith("## ")]
    order = ["## Quickstart", "## Your own photos", "## Running a search", "## Strategies",
             "## Outputs", "## Using the model", "## GPU, TPU VM and `--target`",
             "## Development", "## Links"]
    assert headings == order, headings


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores
    dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_lead_somewhere(doc):
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT)}")
            continue
        if anchor and path.suffix == ".md":
            anchors = {slug(line.lstrip("#")) for line in path.read_text().splitlines()
                       if line.startswith("#")}
            if anchor not in anchors:
                broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, broken
