"""txt: logit KD at every text position the cache scored, prompt and response (Align-KD's logit term as
its authors compute it, over all positions; vlmkd's `res` covers the response): needs a cache built with
score_text."""

from __future__ import annotations

from vlmkd.errors import RecipeError
from vlmkd.train.terms.logits import LogitOptions, TeacherLogitTerm


class Txt(TeacherLogitTerm):
    name = "txt"
    rows = "t_txt"

    def __init__(self, opts: LogitOptions, setup):
        super().__init__(opts, setup)
        if not setup.cache.extraction.get("score_text"):
            raise RecipeError(f"{setup.where}: loss 'txt' needs a cache built with --score-text (teacher rows at every "
                              "prompt position; `res` distils the response rows every cache has)")
