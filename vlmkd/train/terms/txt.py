"""txt: logit KD at every text position the cache scored, prompt and response (Align-KD's logit term as
its authors compute it, over all positions; vlmkd's `res` covers the response): needs a cache built with
score_text."""

from __future__ import annotations

from vlmkd.train.terms.logits import TeacherLogitTerm


class Txt(TeacherLogitTerm):
    name = "txt"
    rows = "t_txt"
    needs = ("score_text", "--score-text",
             "teacher rows at every prompt position; `res` distils the response rows every cache has")
