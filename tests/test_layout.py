"""The package layout holds: the ground floor imports no stage, no stage imports a stage above it, no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lesiongen"
# Stages in pipeline order; a module may import the ground floor, its own stage and the stages before it.
STAGES = ("captions", "diffusion", "classify", "evaluate", "audit", "demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the lesiongen modules a file imports (relative imports resolved), lazy ones included."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            found.update({prefix} | {f"{prefix}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("lesiongen")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(p) if m in files and m != name} for name, p in files.items()}


def stage_of(module: str) -> int:
    """-1 for the ground floor (lesiongen.labels, ...), else the index of the module's stage folder."""
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 2 and parts[1] in STAGES else -1


def test_no_module_imports_from_a_stage_above_it():
    upward = [
        f"{a} -> {b}" for a, deps in graph().items() for b in deps if stage_of(b) > stage_of(a) and stage_of(b) >= 0
    ]
    assert upward == []


def test_no_import_circles():
    g = graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(g[start])
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(g.get(node, ()))
        return False

    packages = {m for m in g if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").is_file()}
    circles = sorted({tuple(sorted((a, b))) for a in g for b in g[a] if a not in packages and reaches(b, a)})
    assert circles == []


def test_the_ground_floor_stays_small_and_every_stage_is_a_folder():
    ground = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(ground) <= 10, ground
    assert all((PACKAGE / s / "__init__.py").is_file() for s in STAGES)
