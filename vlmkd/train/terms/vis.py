"""vis: logit KD on the visual-token positions (LLaVA-KD MDist L_vis): needs a cache built with
score_visual."""

from __future__ import annotations

from vlmkd.errors import RecipeError
from vlmkd.train.terms.logits import LogitOptions, TeacherLogitTerm


class Vis(TeacherLogitTerm):
    name = "vis"
    rows = "t_vis"

    def __init__(self, opts: LogitOptions, setup):
        super().__init__(opts, setup)
        if not setup.cache.extraction.get("score_visual"):
            raise RecipeError(f"{setup.where}: loss 'vis' needs a cache built with --score-visual (teacher rows on "
                              "visual tokens)")
