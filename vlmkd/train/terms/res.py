"""res: logit KD on the response positions (LLaVA-KD MDist L_res; the logit term of Align-KD and of
plain logit KD), from the cache's top-k + tail (or sampled) teacher rows."""

from __future__ import annotations

from vlmkd.train.terms.logits import TeacherLogitTerm


class Res(TeacherLogitTerm):
    name = "res"
    rows = "t_res"
