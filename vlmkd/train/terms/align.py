"""align: Align-KD's text-focused projection alignment: the student's projected visual tokens, through
a learned map, against the teacher's projector outputs. `align_kind: focus` (vlmkd's default) weights
each token by the text's attention to it in the cache (text focus); `authors` is the authors' own
(`get_v_loss` in fqhank/Align-KD): a plain mean squared difference over every visual token plus 0.1 x
the same over the 32 tokens the text attends to most. The text focus comes from the cached layers
`focus_layers` names (default: every cached layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkd.errors import RecipeError
from vlmkd.losses import focus_align, text_focus, top_focus_align
from vlmkd.models.probe import visual_rows
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class AlignOptions:
    align_kind: str = "focus"  # focus | authors
    focus_layers: list[int] | None = None  # the cached attention layers the text focus averages (None: all)
    align_top_k: int = 32  # authors: the most-attended tokens given extra weight
    align_top_weight: float = 0.1  # authors: that extra weight

    def __post_init__(self):
        if self.align_kind not in ("focus", "authors"):
            raise RecipeError(f"loss_args.align_kind {self.align_kind!r}: choose focus or authors")


class Align(Term):
    name = "align"
    cross_ok = True
    visual = True
    options = AlignOptions

    def __init__(self, opts: AlignOptions, setup: Setup):
        super().__init__(opts, setup)
        setup.cache.need_full_width(f"{setup.where}: loss 'align'")
        setup.cache.need_point("projector", f"{setup.where}: loss 'align'")
        layers = setup.cache.attn_layers if opts.focus_layers is None else opts.focus_layers
        self.focus_idx = setup.cache.attn_indices(layers, "focus_layers", setup.where)
        self.payloads = ("attn", "hidden")
        self.hidden_points = ("projector",)
        self.point_index = setup.cache.points.index("projector")
        self.map_key = setup.linear("align")

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        states, mask = visual_rows(s.probe, "projector", b["image_mask"])
        s_vis = s.maps[self.map_key](states)
        t_vis = b["t_hidden"][:, self.point_index]
        focus = text_focus(b["t_attn"][:, self.focus_idx], b["t_qmask"])
        if self.opts.align_kind == "authors":
            return top_focus_align(s_vis, t_vis, focus, self.opts.align_top_k, self.opts.align_top_weight, mask)
        # rows of mixed counts need no mask here: a padded token's text focus is 0 (the cache pads attention with 0)
        return focus_align(s_vis, t_vis, focus)
