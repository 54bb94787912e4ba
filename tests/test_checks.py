"""Params held against the data before any image is embedded (vlm/data/checks.py), and recipes (vlm/recipes.py)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from vlm.config import AlignConfig, GridConfig, Params, ParamsError, QFormerTrainConfig, VLMTrainConfig, load_params
from vlm.data.checks import DataMismatch, SplitSummary, check_params, raise_on_fatal, summarize
from vlm.recipes import apply_recipe, read_recipe, recipe_path

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
FULL = SplitSummary(images=100, with_captions=100, with_questions=100, with_regions=100)


def splits(train: SplitSummary = FULL, test: SplitSummary = FULL) -> dict[str, SplitSummary]:
    return {"train": train, "val": FULL, "test": test}


def scenes() -> Params:
    return load_params(REPO / "params.yaml")


def fatal(problems) -> list[str]:
    return [p.param for p in problems if p.fatal]


def test_the_scenes_recipe_fits_the_scenes() -> None:
    assert check_params(scenes(), splits()) == []


def test_a_grid_target_on_data_without_regions_names_the_recipe_that_fits() -> None:
    no_regions = replace(FULL, with_regions=0)
    problems = check_params(scenes(), splits(train=no_regions))
    assert fatal(problems) == ["train_vlm.align.target"]
    with pytest.raises(DataMismatch, match=r"train_vlm.align.target.*none of the 100 has any.*vlm recipe own-data"):
        raise_on_fatal(problems)
    assert check_params(Params(), splits(train=no_regions)) == []  # the code's defaults: BLIP-2's plain queries


def test_stage1_without_any_caption_fails_and_points_at_the_question_texts() -> None:
    questions_only = replace(FULL, with_captions=0, with_regions=0)
    problems = check_params(Params(), splits(train=questions_only, test=questions_only))
    assert fatal(problems) == ["train_qformer.texts", "train_vlm.align.target"]
    assert "vlm recipe question-only" in str(problems[0])
    fixed = replace(Params(), train_qformer=QFormerTrainConfig(texts="questions"),
                    train_vlm=VLMTrainConfig(align=AlignConfig(target="answers")))
    problems = check_params(fixed, splits(train=questions_only, test=questions_only))
    assert fatal(problems) == [] and any("CIDEr" in p.fix for p in problems)  # said, not fatal


def test_images_without_captions_are_a_warning_counted_not_an_error() -> None:
    partly = replace(FULL, with_captions=80, with_regions=0)
    problems = check_params(Params(), splits(train=partly, test=partly))
    assert fatal(problems) == []
    assert [p.param for p in problems] == ["train_qformer.texts"] and "20 of 100" in problems[0].problem


def test_a_test_split_with_nothing_to_score_or_too_small_for_retrieval() -> None:
    empty = SplitSummary(images=10, with_captions=0, with_questions=0, with_regions=0)
    assert "data" in fatal(check_params(Params(), splits(test=empty)))
    small = replace(FULL, images=6, with_captions=6, with_questions=6)
    warnings = [p for p in check_params(Params(), splits(test=small)) if not p.fatal]
    assert any("recall@10" in p.problem for p in warnings)


def test_a_grid_needs_a_query_per_cell() -> None:
    params = replace(scenes(), train_vlm=replace(scenes().train_vlm, grid=GridConfig(size=6)))
    assert "qformer.num_queries" in fatal(check_params(params, splits()))


def test_summaries_count_images_with_each_kind_of_text() -> None:
    rows = [{"captions": ["a"], "questions": [], "regions": []}, {"captions": [], "questions": ["q"], "regions": [1]}]
    assert summarize(rows) == SplitSummary(images=2, with_captions=1, with_questions=1, with_regions=1)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_applies_to_params_yaml_and_sets_every_recipe_key(recipe: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_recipe(recipe, params)
    load_params(params)  # valid

    def keys(values: dict, prefix: str = "") -> set[str]:
        return {k for key, value in values.items() for k in
                (keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}

    # the keys the recipes switch between kinds of data: any recipe applied after another leaves no trace of it
    assert keys(read_recipe(REPO / "recipes" / "scenes.yaml")) <= keys(read_recipe(recipe))


def test_the_scenes_recipe_is_params_yaml_and_applying_keeps_comments(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    assert apply_recipe(recipe_path("scenes", REPO / "recipes"), params) == []
    changes = apply_recipe(recipe_path("own-data", REPO / "recipes"), params)
    assert ("train_vlm.grid.size", 3, 0) in changes
    text = params.read_text()
    assert text.count("#") == (REPO / "params.yaml").read_text().count("#")
    assert yaml.safe_load(text)["train_vlm"]["align"]["target"] == "caption"
    apply_recipe(recipe_path("scenes", REPO / "recipes"), params)
    assert params.read_text() == (REPO / "params.yaml").read_text()


def test_a_recipe_with_an_unknown_key_changes_nothing(tmp_path: Path) -> None:
    params, recipe = tmp_path / "params.yaml", tmp_path / "bad.yaml"
    shutil.copy(REPO / "params.yaml", params)
    recipe.write_text("train_vlm:\n  grid:\n    sise: 2\n")
    with pytest.raises(ParamsError, match="train_vlm.grid.sise is not a key"):
        apply_recipe(recipe, params)
    recipe.write_text("train_vlm:\n  grid:\n    size: -1\n")
    with pytest.raises(ParamsError, match="train_vlm.grid.size"):
        apply_recipe(recipe, params)
    assert params.read_text() == (REPO / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="recipes in"):
        recipe_path("nope", REPO / "recipes")
