"""The house as docs/architecture.md draws it: every module on one floor of its module map, no
import from a floor above, no cycle (function-level imports included); and the docs a user
walks: the README within its 250 lines, every relative link to a file and heading that exist."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "blockft_jax"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def floors() -> list[list[str]]:
    """The module map's floors, bottom first: the backticked names of the table's second
    column under '## The module map'."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The module map", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")]
    return [re.findall(r"`(\w+)`", row[2]) for row in rows[1:]]  # the header row aside


def modules() -> list[str]:
    """The package's top-level modules and subpackages (`models`)."""
    names = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    return sorted(names + [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()])


def imports(name: str) -> set[str]:
    """The package's top-level modules that module `name` imports, anywhere in its body."""
    paths = [PACKAGE / f"{name}.py"] if (PACKAGE / f"{name}.py").exists() else \
        sorted((PACKAGE / name).rglob("*.py"))
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] != "blockft_jax":
                    continue
                found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names
                          if a.name.startswith("blockft_jax.")}
    return found - {name}


def test_every_module_is_on_exactly_one_floor():
    placed = [name for floor in floors() for name in floor]
    assert sorted(placed) == modules(), (
        "docs/architecture.md's module map and the package disagree: "
        f"missing {sorted(set(modules()) - set(placed))}, "
        f"unknown {sorted(set(placed) - set(modules()))}, "
        f"twice {sorted({n for n in placed if placed.count(n) > 1})}")


def test_no_module_imports_one_on_a_floor_above():
    floor_of = {name: i for i, floor in enumerate(floors()) for name in floor}
    upward = [f"{name} -> {other}" for name in modules() for other in sorted(imports(name))
              if other in floor_of and floor_of[other] > floor_of[name]]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    graph = {name: imports(name) & set(modules()) for name in modules()}
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
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2]
                    if "#" not in here and not above.strip().startswith("#"):
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
