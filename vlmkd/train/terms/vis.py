"""vis: logit KD on the visual-token positions (LLaVA-KD MDist L_vis): needs a cache built with
score_visual."""

from __future__ import annotations

from vlmkd.train.terms.logits import TeacherLogitTerm


class Vis(TeacherLogitTerm):
    name = "vis"
    rows = "t_vis"
    needs = ("score_visual", "--score-visual", "teacher rows on visual tokens")
