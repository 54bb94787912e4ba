"""Floors point down only: data -> models -> train / eval / embed -> stages, cli, serve (../shared/DESIGN.md).

Every `import vlm...` in the package (function-level ones too) is checked against the floor of the module that
makes it. Evaluation and inference (assistant, export, serve) never import training code: what both need (tasks,
prompts, grid targets) lives below them.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (floor, module prefixes): a module may import from its own floor and those below it.
FLOORS = [
    (0, ("vlm.config", "vlm.artifacts", "vlm.precision", "vlm.distributed", "vlm.recipes", "vlm.launch",
         "vlm.stage_main")),
    (1, ("vlm.data", "vlm.messages", "vlm.weights")),
    (2, ("vlm.models", "vlm.losses")),
    (3, ("vlm.train", "vlm.eval", "vlm.embed")),
    (4, ("vlm.assistant", "vlm.export", "vlm.serve", "vlm.cli", "vlm")),
]
NO_TRAINING = ("vlm.eval", "vlm.assistant", "vlm.export", "vlm.serve", "vlm.models", "vlm.data")


def floor(module: str) -> int:
    for level, prefixes in FLOORS:
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return level
    raise AssertionError(f"{module}: on no floor; add it to FLOORS in {__file__}")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "vlm" or name.startswith("vlm.")}


def upward_imports() -> list[str]:
    found = []
    for path in sorted((REPO / "vlm").rglob("*.py")):
        if "metrics" in path.relative_to(REPO / "vlm").parts:  # evaluate's metric scripts, loaded by path
            continue
        module = module_name(path)
        for name in imported(path):
            if name == "vlm":
                continue
            if floor(name) > floor(module):
                found.append(f"{module} (floor {floor(module)}) imports {name} (floor {floor(name)})")
            if name.startswith("vlm.train") and module.startswith(NO_TRAINING):
                found.append(f"{module} imports training code: {name}")
    return found


def test_no_module_imports_from_a_floor_above_its_own() -> None:
    assert upward_imports() == []


def test_the_walk_finds_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from vlm.train.stage2 import x\n    import vlm.eval.run\n")
    assert imported(source) == {"vlm.train.stage2", "vlm.eval.run"}
