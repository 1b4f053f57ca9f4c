"""align: Align-KD's text-focused projection alignment: the student's projected visual tokens, through
a learned map, against the teacher's projector outputs, each token weighted by the text's attention
to it in the cache (text focus, averaged over every cached attention layer)."""

from __future__ import annotations

import torch

from vlmkd.losses import focus_align, text_focus
from vlmkd.models.probe import visual_rows
from vlmkd.train.terms.base import Setup, Step, Term


class Align(Term):
    name = "align"
    cross_ok = True
    visual = True

    def __init__(self, opts, setup: Setup):
        super().__init__(opts, setup)
        setup.cache.need_full_width(f"{setup.where}: loss 'align'")
        setup.cache.need_point("projector", f"{setup.where}: loss 'align'")
        self.payloads = ("attn", "hidden")
        self.hidden_points = ("projector",)
        self.point_index = setup.cache.points.index("projector")
        self.map_key = setup.linear("align")

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        # rows of mixed counts need no mask: a padded token's text focus is 0 (the cache pads attention with 0)
        s_vis = s.maps[self.map_key](visual_rows(s.probe, "projector", b["image_mask"])[0])
        t_vis = b["t_hidden"][:, self.point_index]
        return focus_align(s_vis, t_vis, text_focus(b["t_attn"], b["t_qmask"]))
