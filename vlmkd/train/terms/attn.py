"""attn: text-to-vision attention distillation (Align-KD's shallow layers), the student's eager
attention at the chosen layers against the cache's maps; per layer pair under a layer map."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkd.errors import RecipeError
from vlmkd.losses import attention_kd
from vlmkd.models.probe import visual_mask
from vlmkd.train.layer_map import layer_pairs
from vlmkd.train.terms.base import Setup, Step, Term


@dataclass
class AttnOptions:
    attn_kind: str = "mse"  # mse | kl | kl_raw (Align-KD's authors': unnormalised, per entry)
    attn_layers: list[int] | None = None  # default: every cached layer
    layer_map: str | dict | None = None  # student -> teacher layer pairs (vlmkd.train.layer_map)

    def __post_init__(self):
        if self.attn_kind not in ("mse", "kl", "kl_raw"):
            raise RecipeError(f"loss_args.attn_kind {self.attn_kind!r}: choose mse, kl or kl_raw")


class Attn(Term):
    name = "attn"
    visual = True
    options = AttnOptions

    def __init__(self, opts: AttnOptions, setup: Setup):
        super().__init__(opts, setup)
        self.payloads = ("attn",)
        if opts.layer_map is not None:
            pairs = layer_pairs(opts.layer_map, setup.student_layers, setup.cache.teacher.get("num_layers"))
            self.teacher_idx = setup.cache.attn_indices([pt for _, pt in pairs], "layer_map's teacher layers",
                                                        setup.where)
            self.attn_layers = tuple(sorted({ps for ps, _ in pairs}))
            self.student_idx = [self.attn_layers.index(ps) for ps, _ in pairs]
        else:
            layers = setup.cache.attn_layers if opts.attn_layers is None else opts.attn_layers
            self.teacher_idx = setup.cache.attn_indices(layers, "attn_layers", setup.where)
            self.attn_layers = tuple(layers)
            deep = [li for li in layers if li >= setup.student_layers]
            if deep:
                raise RecipeError(f"{setup.where}: attn compares the student's attention at the teacher's layers "
                                  f"{list(layers)}, and the student has {setup.student_layers} layer(s): set "
                                  f"loss_args.attn_layers to ones below {setup.student_layers}, or a layer_map")
            self.student_idx = list(range(len(layers)))

    def loss(self, s: Step) -> torch.Tensor:
        b = s.batch
        qpos = b["t_qpos"]  # [B_v, Q]: the cache's maps are stacked over the rows with an image
        vr = s.vis_rows
        image_mask = b["image_mask"][vr]
        keys = visual_mask(image_mask)  # [B_v, N_max]: each row's own visual-token count
        mixed = not bool(keys.all())
        vis_idx = torch.zeros(keys.shape, dtype=torch.long, device=image_mask.device)
        vis_idx[keys] = image_mask.nonzero()[:, 1]  # row-major, as the mask's True entries lie
        maps = []
        for li in self.attn_layers:
            p = s.probe.attn[li].mean(1)[vr]  # [B_v, T, T], heads averaged as the cache stores them
            rows = p[torch.arange(p.shape[0])[:, None], qpos]  # [B_v, Q, T]
            m = rows.gather(2, vis_idx[:, None, :].expand(-1, rows.shape[1], -1))
            maps.append(m * keys[:, None, :] if mixed else m)  # padded keys 0, as the cache pads them
        s_maps = torch.stack(maps, 1)[:, self.student_idx]
        t_maps = b["t_attn"][:, self.teacher_idx]
        return attention_kd(s_maps, t_maps, b["t_qmask"], self.opts.attn_kind, key_mask=keys if mixed else None)
