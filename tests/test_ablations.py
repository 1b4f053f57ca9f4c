"""tools/ablations.py: its rows are the shipped recipes, and each regime runs them as documented."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import ablations  # noqa: E402

from vlmkd.train.recipe import load_recipe  # noqa: E402


def test_every_row_is_a_shipped_recipe_of_the_same_budget():
    rows = {f"{t}/{r}" for t, rs in ablations.TABLES.items() for r in rs}
    shipped = {str(f.relative_to(ablations.ABLATIONS).with_suffix("")) for f in ablations.ABLATIONS.rglob("*.yaml")}
    assert rows == shipped == set(ablations.LABELS)
    for row in rows:
        recipe = load_recipe(ablations.ABLATIONS / f"{row}.yaml")
        assert sum(st.steps for st in recipe.stages) == 600, row
        assert recipe.stages[0].data == "captions" and recipe.stages[0].trainable == ["projector"], row


def test_each_regime_adapts_the_recipe_as_documented(tmp_path):
    lm = tmp_path / "student_lm"
    pre = load_recipe(ablations.regime_recipe("llava_kd/three_stages", "pretrained", lm, tmp_path / "p"))
    assert pre.model["text_from"] == str(lm) and pre.model["vision_from"] == "teacher"
    assert [st.trainable for st in pre.stages] == [["projector"], ["projector", "llm"], ["projector", "llm"]]
    scratch_path = ablations.regime_recipe("llava_kd/three_stages", "scratch", None, tmp_path / "s")
    scratch = load_recipe(scratch_path)
    assert "text_from" not in scratch.model
    assert [st.trainable for st in scratch.stages] == [["projector", "llm"]] * 3
    # everything else is the shipped recipe's
    shipped = yaml.safe_load((ablations.ABLATIONS / "llava_kd" / "three_stages.yaml").read_text())
    for got, want in zip(yaml.safe_load(scratch_path.read_text())["stages"], shipped["stages"], strict=True):
        assert {k: v for k, v in got.items() if k != "trainable"} == {k: v for k, v in want.items() if k != "trainable"}


def test_rows_select_by_paper_or_row():
    assert ablations.select_rows("llava_mod") == ["llava_mod/dense", "llava_mod/moe", "llava_mod/moe_pref"]
    assert ablations.select_rows("align_kd/both,llava_kd/sft") == ["align_kd/both", "llava_kd/sft"]
    import pytest

    with pytest.raises(SystemExit, match="not a row"):
        ablations.select_rows("align_kd/typo")
