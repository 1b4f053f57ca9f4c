"""feat: visual hidden states aligned to the teacher's at a cached point through a learned linear
map; under a layer map, each (student layer, teacher layer) pair through a map of its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkd.errors import RecipeError
from vlmkd.losses import feature_kd
from vlmkd.models.probe import visual_rows
from vlmkd.train.layer_map import layer_pairs
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class FeatOptions:
    feat_kind: str = "mse"  # mse | cosine
    feat_point: str = "final"  # a cached hidden point (without a layer map)
    layer_map: str | dict | None = None

    def __post_init__(self):
        if self.feat_kind not in ("mse", "cosine"):
            raise RecipeError(f"loss_args.feat_kind {self.feat_kind!r}: choose mse or cosine")


class Feat(Term):
    name = "feat"
    cross_ok = True
    visual = True
    options = FeatOptions

    def __init__(self, opts: FeatOptions, setup: Setup):
        super().__init__(opts, setup)
        self.payloads = ("hidden",)
        points = setup.cache.points
        if opts.layer_map is not None:
            pairs = layer_pairs(opts.layer_map, setup.student_layers, setup.cache.teacher.get("num_layers"))
            need = [f"layer:{t}" for _, t in pairs if f"layer:{t}" not in points]
            if need:
                raise RecipeError(f"{setup.where}: layer_map needs the teacher's hidden states at {need}; the cache "
                                  f"has {points}: rebuild it with --hidden-points "
                                  f"{','.join(dict.fromkeys([*points, *need]))}")
            self.pairs = [(f"layer:{ps}", points.index(f"layer:{pt}"), setup.linear(f"feat_{ps}_{pt}"))
                          for ps, pt in pairs]
        else:
            setup.cache.need_point(opts.feat_point, f"{setup.where}: loss 'feat'")
            self.pairs = [(opts.feat_point, points.index(opts.feat_point), setup.linear("feat"))]
        self.hidden_points = tuple(dict.fromkeys(p for p, _, _ in self.pairs))

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        parts = []
        for point, ti, key in self.pairs:
            h_s, mask = visual_rows(s.probe, point, b["image_mask"])  # mask: rows of mixed counts
            parts.append(feature_kd(s.maps[key](h_s), b["t_hidden"][:, ti], mask, kind=self.opts.feat_kind))
        return parts[0] if len(parts) == 1 else sum(parts) / len(parts)
