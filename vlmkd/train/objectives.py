"""The KD objective: one student forward, the recipe's loss terms from the cached teacher.

Terms (keys of a stage's `losses:`, each with its weight):
- ce:    cross-entropy on response tokens (LLaVA-KD L_reg / L_PT)
- res:   logit KD on response positions (LLaVA-KD MDist L_res; the logit term of Align-KD / logit KD)
- vis:   logit KD on visual positions (LLaVA-KD MDist L_vis; needs a cache with score_visual)
- rel:   relation KD on visual tokens, R = H G H^T with each side's LM-head Gram (LLaVA-KD RDist)
- attn:  first-layer text-to-vision attention distillation (Align-KD)
- align: projected visual tokens aligned to the teacher's, weighted by text focus (Align-KD)
- feat:  feature alignment at a hidden point through a learned linear map
- balance: the MoE routers' load-balancing loss (LLaVA-MoD's sparse student; 0 while the LLM is dense)
- contrast: InfoNCE between the student's and the teacher's pooled visual tokens (and pooled prompt
         text, from a cache built with text_pool) across the batch, through a learned projection when
         the widths differ
- pref:  LLaVA-MoD preference distillation, DPO with the teacher as the reference: the student scores
         the chosen and the rejected answer of each cached pair (`pref_beta`, default 0.1)
Options (`loss_args:`): logit_loss (fkl|rkl|jsd|skl|srkl|tvd), temperature (a number, or
{start, end} for a linear schedule over the stage), beta, alpha, attn_kind (mse|kl), attn_layers,
feat_kind (mse|cosine), feat_point (a cached hidden point name), layer_map (student -> teacher layer
pairs for feat and attn: `vlmkd.train.layer_map`), contrast_on ([visual] or [visual, text]),
contrast_tau (0.07), contrast_point (final), contrast_symmetric (true), logit_impl (auto|full|torch|triton:
how ce/res/vis meet the LM head; auto = the fused Triton kernels on a CUDA device, the model's full
logits elsewhere; torch/triton take only the scored rows' hidden states through
`vlmkd.kernels.linear_sparse_kd`, never a [tokens x vocabulary] tensor).
"""

from __future__ import annotations

import contextlib

import torch

from vlmkd.cache.reader import CacheReader
from vlmkd.data.dataset import model_inputs
from vlmkd.errors import RecipeError
from vlmkd.kernels import IMPLS, best_impl, linear_sparse_kd
from vlmkd.losses import (
    SAMPLED_LOSSES,
    attention_kd,
    feature_kd,
    focus_align,
    info_nce,
    linear_temperature,
    logit_kd,
    pooled,
    preference_kd,
    relation_kd,
    sampled_kd,
    text_focus,
)
from vlmkd.losses.sft import response_ce
from vlmkd.models.moe import expert_shares, is_moe, load_balance_loss, record_router_logits
from vlmkd.models.probe import probe, visual_rows
from vlmkd.train.dist import is_sharded
from vlmkd.train.layer_map import layer_pairs
from vlmkd.train.loop import Objective
from vlmkd.train.recipe import Stage

TERMS = ("ce", "res", "vis", "rel", "attn", "align", "feat", "contrast", "balance", "pref")
LOGIT_IMPLS = ("auto", "full", *IMPLS)


class KDObjective(Objective):
    def __init__(self, model, reader: CacheReader, stages: list[Stage]):
        super().__init__()
        man = reader.manifest
        ext = man["extraction"]
        self.points = ext["hidden_points"]
        self.cached_attn_layers = ext["attn_layers"]
        t_dim = ext["hidden_dim"] or man["teacher"]["hidden_size"]
        s_dim = model.config.text_config.hidden_size
        terms = {k for st in stages for k, w in st.losses.items() if w}
        unknown = terms - set(TERMS)
        if unknown:
            raise RecipeError(f"unknown loss term(s) {sorted(unknown)}; known: {TERMS}")
        if "vis" in terms and not ext["score_visual"]:
            raise RecipeError("loss 'vis' needs a cache built with --score-visual (teacher rows on visual tokens)")
        if terms & {"rel", "align"} and ext["hidden_dim"]:
            raise RecipeError("'rel' and 'align' need full-width teacher hidden states (cache without hidden_dim)")
        # a buffer, so that it follows the objective to the training device (not saved: the cache has it)
        self.register_buffer("gram_t", torch.from_numpy(reader.gram()) if "rel" in terms else None, persistent=False)
        if "rel" in terms and "final" not in self.points:
            raise RecipeError("loss 'rel' needs the cache's hidden point 'final'")
        if "align" in terms and "projector" not in self.points:
            raise RecipeError("loss 'align' needs the cache's hidden point 'projector'")
        # learned maps from the student's width to the teacher's (trained with the student)
        self.proj = torch.nn.ModuleDict()
        if "align" in terms:
            self.proj["align"] = torch.nn.Linear(s_dim, t_dim, bias=False)
        if any(st.losses.get("feat") and "layer_map" not in st.loss_args for st in stages):  # (layer maps: below)
            self.proj["feat"] = torch.nn.Linear(s_dim, t_dim, bias=False)
        self.pairs: dict[str, list[tuple[int, int]]] = {}  # stage -> (student, teacher) layers
        n_s, n_t = model.config.text_config.num_hidden_layers, man["teacher"].get("num_layers")
        for st in stages:
            a, on = st.loss_args, {k for k, v in st.losses.items() if v}
            if "layer_map" in a:
                if not on & {"feat", "attn"}:
                    raise RecipeError(f"stage {st.name}: layer_map applies to the feat and attn terms; it has neither")
                pairs = self.pairs[st.name] = layer_pairs(a["layer_map"], n_s, n_t)
                need = [f"layer:{t}" for _, t in pairs if f"layer:{t}" not in self.points] if "feat" in on else []
                if need:
                    raise RecipeError(f"stage {st.name}: layer_map needs the teacher's hidden states at {need}; "
                                      f"the cache has {self.points}: rebuild it with --hidden-points "
                                      f"{','.join(dict.fromkeys([*self.points, *need]))}")
                gone = sorted({t for _, t in pairs} - set(self.cached_attn_layers)) if "attn" in on else []
                if gone:
                    raise RecipeError(f"stage {st.name}: layer_map needs the teacher's attention at layers {gone}; "
                                      f"the cache has {self.cached_attn_layers} (a recipe's cache: attn_layers)")
                if "feat" in on:
                    for ps, pt in pairs:
                        self.proj[f"feat_{ps}_{pt}"] = torch.nn.Linear(s_dim, t_dim, bias=False)
            if "contrast" in on:
                where = set(a.get("contrast_on", ["visual"]))
                if not where or where - {"visual", "text"}:
                    raise RecipeError(f"stage {st.name}: contrast_on lists visual and/or text, not {sorted(where)}")
                if "visual" in where and a.get("contrast_point", "final") not in self.points:
                    raise RecipeError(f"stage {st.name}: contrast needs the cache's hidden point "
                                      f"{a.get('contrast_point', 'final')!r}; it has {self.points}")
                if "text" in where and not ext.get("text_pool"):
                    raise RecipeError(f"stage {st.name}: contrast on text needs a cache built with --text-pool")
                for side in where:
                    if f"contrast_{side}" not in self.proj:
                        self.proj[f"contrast_{side}"] = (torch.nn.Linear(s_dim, t_dim, bias=False) if s_dim != t_dim
                                                        else torch.nn.Identity())
        self.stage_steps = {st.name: st.steps for st in stages}
        self._stats: dict[str, float] = {}  # router loads of the last forward (MoE students)
        self.sampled = ext.get("logits", "topk") == "sampled"
        if self.sampled:
            for st in stages:
                if not st.losses.keys() & {"res", "vis"}:
                    continue
                a = st.loss_args
                if a.get("logit_loss", "fkl") not in SAMPLED_LOSSES:
                    raise RecipeError(f"stage {st.name}: logit_loss {a['logit_loss']!r} is biased on a sampled cache "
                                      f"(it needs p inside a log); sampled caches support {SAMPLED_LOSSES}, or "
                                      "build a --logits topk cache")
                if a.get("temperature", 1.0) != 1.0:
                    raise RecipeError(f"stage {st.name}: a distillation temperature needs the teacher's whole "
                                      "distribution to renormalise; a sampled cache supports temperature 1 only")
                if a.get("logit_impl", "auto") not in ("auto", "full"):
                    raise RecipeError(f"stage {st.name}: the fused LM-head kernels take top-k targets; use "
                                      "logit_impl: auto or full with a sampled cache")

    def _temperature(self, stage: Stage, step: int) -> float:
        t = stage.loss_args.get("temperature", 1.0)
        if isinstance(t, dict):
            return linear_temperature(step, self.stage_steps[stage.name], t.get("start", 5.0), t.get("end", 1.0))
        return float(t)

    def forward(self, stage: Stage, model, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        w = {k: v for k, v in stage.losses.items() if v}
        a = stage.loss_args
        pairs = self.pairs.get(stage.name)
        attn_layers = a.get("attn_layers", self.cached_attn_layers) if w.keys() & {"attn"} else []
        if pairs and "attn" in w:
            attn_layers = sorted({ps for ps, _ in pairs})
        hidden = set()
        if "feat" in w and pairs:
            hidden |= {f"layer:{ps}" for ps, _ in pairs}
        if "contrast" in w:
            hidden.add(a.get("contrast_point", "final"))
            if "text" in a.get("contrast_on", ["visual"]):
                hidden.add("final")
        if "rel" in w:
            hidden.add("final")
        if "align" in w:
            hidden.add("projector")
        if "feat" in w:
            hidden.add(a.get("feat_point", "final"))
        impl = a.get("logit_impl", "auto")
        if impl not in LOGIT_IMPLS:
            raise RecipeError(f"loss_args.logit_impl {impl!r}: choose one of {LOGIT_IMPLS}")
        if impl == "auto":
            impl = "triton" if best_impl(next(model.parameters()).device) == "triton" else "full"
            if is_sharded(model) or self.sampled or "pref" in w:
                impl = "full"  # FSDP gathers the LM head only inside the model's own forward
        elif impl != "full" and "pref" in w:
            raise RecipeError("the pref term scores whole answers from the model's logits: use logit_impl auto or full")
        elif impl != "full" and is_sharded(model):
            raise RecipeError(f"logit_impl {impl!r} needs the whole LM head on each rank: use parallel: ddp, "
                              "or logit_impl: full under fsdp")
        moe = is_moe(model)
        routing = record_router_logits(model) if moe else contextlib.nullcontext([])
        with probe(model, batch["attention_mask"], attn_layers, sorted(hidden)) as pr, routing as router_logits:
            if impl == "full":
                logits = model(**model_inputs(batch)).logits
            else:  # the final hidden states; the LM head is applied inside the fused loss, row chunk by chunk
                states = model.model(**model_inputs(batch)).last_hidden_state
        terms: dict[str, torch.Tensor] = {}
        self._stats = {}
        if moe:
            top_k = model.config.text_config.num_experts_per_tok
            mask = batch["attention_mask"].bool()
            shares = expert_shares(router_logits, top_k, mask)
            self._stats = {"moe_load_max": float(shares.max(-1).values.mean()),
                           "moe_load_min": float(shares.min(-1).values.mean())}
            if "balance" in w:
                terms["balance"] = load_balance_loss(router_logits, top_k, mask)
        elif "balance" in w:
            terms["balance"] = next(model.parameters()).sum() * 0.0  # dense stage: nothing to balance yet
        tau = self._temperature(stage, step)
        kd_args = dict(loss=a.get("logit_loss", "fkl"), temperature=tau, beta=a.get("beta", 0.5),
                       alpha=a.get("alpha", 0.1))
        if impl == "full":
            if "ce" in w:
                terms["ce"] = response_ce(logits, batch["input_ids"], batch["labels_mask"])
            for term, rows in (("res", "t_res"), ("vis", "t_vis")):
                if term in w and self.sampled:
                    terms[term] = sampled_kd(logits, batch["t_ids"], batch["t_w"], batch[rows], batch["t_lp"])
                elif term in w:
                    terms[term] = logit_kd(logits, batch["t_ids"], batch["t_lp"], batch[rows],
                                           teacher_tail=batch["t_tail"], **kd_args)
        else:
            head = model.lm_head.weight
            if "ce" in w:  # cross-entropy = forward KL to a one-hot teacher: k = 1, log-prob 0, no tail
                mask = batch["labels_mask"][:, 1:]
                targets = batch["input_ids"][:, 1:][mask][:, None]
                terms["ce"] = _rows_kd(states[:, :-1], head, mask, targets, torch.zeros(targets.shape),
                                       torch.full(targets.shape[:1], float("-inf")), impl, loss="fkl")
            for term, rows in (("res", "t_res"), ("vis", "t_vis")):
                if term in w:
                    m = batch[rows]
                    terms[term] = _rows_kd(states, head, m, batch["t_ids"][m], batch["t_lp"][m], batch["t_tail"][m],
                                           impl, **kd_args)
        if "pref" in w:
            s_chosen = sequence_logprob(logits, batch["input_ids"], batch["labels_mask"])
            r_logits = model(input_ids=batch["r_input_ids"], attention_mask=batch["r_attention_mask"],
                             pixel_values=batch["pixel_values"]).logits
            s_rejected = sequence_logprob(r_logits, batch["r_input_ids"], batch["r_labels_mask"])
            terms["pref"] = preference_kd(s_chosen, s_rejected, batch["t_pref_chosen"], batch["t_pref_rejected"],
                                          beta=a.get("pref_beta", 0.1))
        if "rel" in w:
            h_s = visual_rows(pr, "final", batch["image_mask"])
            h_t = batch["t_hidden"][:, self.points.index("final")]
            w_s = model.lm_head.weight
            terms["rel"] = relation_kd(h_s, h_t, student_gram=w_s.T @ w_s, teacher_gram=self.gram_t)
        if "attn" in w or "align" in w:
            qpos, qmask = batch["t_qpos"], batch["t_qmask"]
        if "attn" in w:
            maps = []
            for li in attn_layers:
                p = pr.attn[li].mean(1)  # [B, T, T], heads averaged as the cache stores them
                B = p.shape[0]
                rows = p[torch.arange(B)[:, None], qpos]  # [B, Q, T]
                n = int(batch["image_mask"][0].sum())
                vis_idx = batch["image_mask"].nonzero()[:, 1].reshape(B, n)
                maps.append(rows.gather(2, vis_idx[:, None, :].expand(-1, rows.shape[1], -1)))
            s_maps = torch.stack(maps, 1)
            if pairs:  # each pair's student map against its teacher layer's map
                s_maps = s_maps[:, [attn_layers.index(ps) for ps, _ in pairs]]
                t_maps = batch["t_attn"][:, [self.cached_attn_layers.index(pt) for _, pt in pairs]]
            else:
                t_maps = batch["t_attn"][:, [self.cached_attn_layers.index(li) for li in attn_layers]]
            terms["attn"] = attention_kd(s_maps, t_maps, qmask, a.get("attn_kind", "mse"))
        if "align" in w:
            s_vis = self.proj["align"](visual_rows(pr, "projector", batch["image_mask"]))
            t_vis = batch["t_hidden"][:, self.points.index("projector")]
            focus = text_focus(batch["t_attn"], qmask)
            terms["align"] = focus_align(s_vis, t_vis, focus)
        if "feat" in w and pairs:
            terms["feat"] = sum(
                feature_kd(self.proj[f"feat_{ps}_{pt}"](visual_rows(pr, f"layer:{ps}", batch["image_mask"])),
                           batch["t_hidden"][:, self.points.index(f"layer:{pt}")], kind=a.get("feat_kind", "mse"))
                for ps, pt in pairs) / len(pairs)
        elif "feat" in w:
            point = a.get("feat_point", "final")
            s_f = self.proj["feat"](visual_rows(pr, point, batch["image_mask"]))
            terms["feat"] = feature_kd(s_f, batch["t_hidden"][:, self.points.index(point)],
                                       kind=a.get("feat_kind", "mse"))
        if "contrast" in w:
            tau, sym = a.get("contrast_tau", 0.07), a.get("contrast_symmetric", True)
            parts = []
            for side in a.get("contrast_on", ["visual"]):
                if side == "visual":
                    point = a.get("contrast_point", "final")
                    s_vec = visual_rows(pr, point, batch["image_mask"]).mean(1)
                    t_vec = batch["t_hidden"][:, self.points.index(point)].mean(1)
                else:  # the prompt's text tokens, as the cache pooled them
                    text = batch["attention_mask"].bool() & ~batch["image_mask"] & ~batch["labels_mask"]
                    s_vec, t_vec = pooled(pr.hidden["final"], text), batch["t_text"]
                parts.append(info_nce(self.proj[f"contrast_{side}"](s_vec), t_vec.to(s_vec.device), tau, sym))
            terms["contrast"] = sum(parts) / len(parts)
        return terms

    def stats(self) -> dict[str, float]:
        return dict(self._stats)


def _rows_kd(states, head, mask, ids, lps, tail, impl, **kd_args) -> torch.Tensor:
    """Sparse-target KD of the LM head's distribution at the masked rows of `states` [B, T, D]; 0 (with a
    gradient path) where no row is masked, as `logit_kd` gives."""
    if not mask.any():
        return states.sum() * 0.0
    dev = states.device
    return linear_sparse_kd(states[mask], head, ids.to(dev), lps.to(dev, head.dtype), tail.to(dev, head.dtype),
                            impl=impl, **kd_args)


def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """[B]: the summed log-prob of each row's response tokens (position t predicted at t - 1)."""
    z = logits[:, :-1]
    lp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1).gather(-1, input_ids[:, 1:, None])
    return (lp[..., 0] * labels_mask[:, 1:]).sum(-1)
