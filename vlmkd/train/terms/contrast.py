"""contrast: InfoNCE between the student's and the teacher's pooled visual tokens (and pooled prompt
text, from a cache built with text_pool) across the batch, through learned maps when widths differ."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkd.errors import RecipeError
from vlmkd.losses import info_nce, pooled
from vlmkd.models.probe import visual_rows
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class ContrastOptions:
    contrast_on: list[str] = field(default_factory=lambda: ["visual"])  # visual and/or text
    contrast_tau: float = 0.07
    contrast_point: str = "final"
    contrast_symmetric: bool = True

    def __post_init__(self):
        if not self.contrast_on or set(self.contrast_on) - {"visual", "text"}:
            raise RecipeError(f"loss_args.contrast_on lists visual and/or text, not {self.contrast_on}")


class Contrast(Term):
    name = "contrast"
    cross_ok = True
    options = ContrastOptions

    def __init__(self, opts: ContrastOptions, setup: Setup):
        super().__init__(opts, setup)
        sides = list(dict.fromkeys(opts.contrast_on))
        self.visual = sides == ["visual"]  # with text too, text-only rows take part on the text side
        payloads, points = ["hidden"], []
        if "visual" in sides:
            setup.cache.need_point(opts.contrast_point, f"{setup.where}: loss 'contrast'")
            points.append(opts.contrast_point)
            self.point_index = setup.cache.points.index(opts.contrast_point)
        if "text" in sides:
            if not setup.cache.extraction.get("text_pool"):
                raise RecipeError(f"{setup.where}: contrast on text needs a cache built with --text-pool")
            payloads.append("pooled")
            points.append("final")
        self.payloads, self.hidden_points = tuple(payloads), tuple(dict.fromkeys(points))
        self.maps = {side: setup.linear(f"contrast_{side}", identity_when_equal=True) for side in sides}

    def loss(self, s: Step) -> torch.Tensor:
        b, o = s.batch, self.opts
        parts = []
        for side, key in self.maps.items():
            if side == "visual":
                if not len(s.vis_rows):
                    continue
                h_s, mask = visual_rows(s.probe, o.contrast_point, b["image_mask"])
                h_t = b["t_hidden"][:, self.point_index]
                if mask is None:
                    s_vec, t_vec = h_s.mean(1), h_t.mean(1)
                else:  # rows of mixed counts: each row's mean over its own visual tokens
                    s_vec, t_vec = pooled(h_s, mask), pooled(h_t.to(h_s.device), mask)
            else:  # the prompt's text tokens, as the cache pooled them
                text = b["attention_mask"].bool() & ~b["image_mask"] & ~b["labels_mask"]
                s_vec, t_vec = pooled(s.probe.hidden["final"], text), b["t_text"]
            parts.append(info_nce(s.maps[key](s_vec), t_vec.to(s_vec.device), o.contrast_tau, o.contrast_symmetric))
        return sum(parts) / len(parts) if parts else s.zero()
