"""Recipes: ready sets of params for a kind of data, applied onto params.yaml (`vlm recipe NAME`).

A recipe is a YAML file in recipes/ with the same sections as params.yaml, holding only the keys it sets. Applying
one rewrites those values in params.yaml in place, comments and all (ruamel.yaml, which DVC uses for the same job),
so the result is an ordinary params.yaml: `dvc repro` runs it, and `dvc exp run` records it as an experiment that
`dvc exp show` / `dvc metrics diff` compare with another recipe's. Every recipe sets every key any recipe switches
between data kinds (tests/test_recipes.py checks), so the order in which recipes are applied does not matter.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from vlm.config import Params, ParamsError, build

RECIPES_DIR = Path("recipes")


def recipe_path(name: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    """The recipe file of `name` (a file in `recipes_dir`, with or without .yaml) or of a path to a YAML file."""
    candidates = [Path(name), recipes_dir / name, recipes_dir / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in recipes_dir.glob("*.yaml"))) or "none"
    raise ParamsError(f"recipe {name!r} not found; recipes in {recipes_dir}/: {known}")


def read_recipe(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: a recipe is a mapping of params.yaml sections")
    return values


def apply_recipe(recipe: Path, params_path: Path = Path("params.yaml")) -> list[tuple[str, Any, Any]]:
    """Set the recipe's values in `params_path`, keeping its comments; returns (key, old, new) for every value that
    changed. Nothing is written when a key is unknown to params.yaml or the result does not validate."""
    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # keep long comment lines as they are
    round_trip.representer.add_representer(  # null, as params.yaml spells it, not an empty value
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = round_trip.load(Path(params_path).read_text())
    changes: list[tuple[str, Any, Any]] = []
    _merge(document, read_recipe(recipe), prefix="", changes=changes, source=recipe)
    buffer = io.StringIO()
    round_trip.dump(document, buffer)
    text = buffer.getvalue()
    build(Params, yaml.safe_load(text) or {}, prefix="")  # raises ParamsError naming the key
    if changes:
        tmp = Path(params_path).with_name(f".{Path(params_path).name}.tmp")
        tmp.write_text(text)
        tmp.replace(params_path)
    return changes


def _merge(target: CommentedMap, values: dict, prefix: str, changes: list, source: Path) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in target:
            raise ParamsError(f"{source}: {name} is not a key of params.yaml; a recipe sets existing params only")
        if isinstance(value, dict) and isinstance(target[key], dict) and value:
            _merge(target[key], value, f"{name}.", changes, source)  # in place: a flow-style mapping stays one
        elif _plain(target[key]) != value:
            changes.append((name, _plain(target[key]), value))
            target[key] = value


def _plain(value: Any) -> Any:
    """A ruamel value as plain Python, for comparing with the recipe's."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
