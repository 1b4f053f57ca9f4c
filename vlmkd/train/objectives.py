"""The KD objective: per stage a plan made once from the stage's terms (`vlmkd.train.terms`), and per
step one student pass that gives every term what it declared, then the terms in their fixed order.

Terms (keys of a stage's `losses:`, each with its weight; each term's module says what it computes):
ce, res, vis, rel, attn, align, feat, contrast, balance, pref. Options (`loss_args:`) belong to the
terms that read them (unknown keys are refused when the recipe is read: `terms.check_loss_args`),
except `logit_impl` (auto|full|torch|triton): how ce/res/vis meet the LM head; auto = the fused Triton
kernels on a CUDA device, the model's full logits elsewhere; torch/triton take only the scored rows'
hidden states through `vlmkd.kernels.linear_sparse_kd`, never a [tokens x vocabulary] tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vlmkd.data.dataset import model_inputs
from vlmkd.errors import RecipeError
from vlmkd.kernels import best_impl
from vlmkd.models.moe import expert_shares, is_moe, record_router_logits
from vlmkd.models.probe import probe
from vlmkd.train.dist import is_sharded
from vlmkd.train.loop import Objective
from vlmkd.train.recipe import Stage
from vlmkd.train.terms import ORDER, TERMS, CacheFacts, Setup, Step, Term, check_loss_args, stage_options

LOGIT_TERMS = ("ce", "res", "vis")


@dataclass
class StagePlan:
    """What one stage's step computes: its terms (in ORDER) and the union of what they need."""

    terms: list[tuple[str, Term]]
    attn_layers: list[int]
    hidden: list[str]
    full_logits: bool  # some term needs the model's whole logits (pref, a sampled cache)
    impl: str  # the recipe's logit_impl


class KDObjective(Objective):
    def __init__(self, model, cache: CacheFacts, stages: list[Stage], stage_caches: dict[str, CacheFacts] | None = None):
        """`cache`: the facts of the run's cache; `stage_caches`: of the stages that read their own
        (a stage's `cache:`), by stage name."""
        super().__init__()
        cfg = model.config.text_config
        # learned maps from the student's width to the teacher's (trained with the student), shared by
        # the stages that use the same key
        self.proj = torch.nn.ModuleDict()
        self.terms = torch.nn.ModuleDict()  # "stage/term" -> Term (buffers such as rel's Gram follow .to())
        self.plans: dict[str, StagePlan] = {}
        for st in stages:
            check_loss_args(st, f"stage {st.name}")
            setup = Setup(st, (stage_caches or {}).get(st.name, cache), cfg.hidden_size, cfg.num_hidden_layers,
                          self.proj)
            on = {k for k, w in st.losses.items() if w}
            if setup.cache.cross_tokenizer:
                refuse_cross(st.name, on)
            terms = []
            for cls in ORDER:
                if cls.name in on:
                    term = cls(stage_options(st, cls.name), setup)
                    self.terms[f"{st.name}/{cls.name}"] = term
                    terms.append((cls.name, term))
            impl = st.loss_args.get("logit_impl", "auto")
            full = any(t.full_logits for _, t in terms)
            if full and impl not in ("auto", "full") and on & set(LOGIT_TERMS):
                why = "pref scores whole answers" if "pref" in on else "the fused kernels take top-k targets"
                raise RecipeError(f"stage {st.name}: logit_impl {impl!r} is not possible here ({why}): use "
                                  "logit_impl auto or full")
            self.plans[st.name] = StagePlan(
                terms=terms,
                attn_layers=sorted({li for _, t in terms for li in t.attn_layers}),
                hidden=sorted({p for _, t in terms for p in t.hidden_points}),
                full_logits=full, impl=impl)
        own = set(stage_caches or {})
        self.payloads = self.payloads_of([st.name for st in stages if st.name not in own])
        self._stats: dict[str, float] = {}  # router loads of the last forward (MoE students)

    def payloads_of(self, stage_names: list[str]) -> tuple[str, ...]:
        """What a reader serving these stages decodes: tokens, image and the payloads of their terms."""
        return tuple(dict.fromkeys(["tokens", "image", *(p for name in stage_names
                                                         for _, t in self.plans[name].terms for p in t.payloads)]))

    def _impl(self, plan: StagePlan, model) -> str:
        impl = plan.impl
        if impl == "auto":
            # FSDP gathers the LM head only inside the model's forward; a Trainer's DDP wrapper syncs there
            if plan.full_logits or is_sharded(model) or getattr(model, "_vlmkd_wrapped", False):
                return "full"
            return "triton" if best_impl(next(model.parameters()).device) == "triton" else "full"
        if impl != "full" and is_sharded(model):
            raise RecipeError(f"logit_impl {impl!r} needs the whole LM head on each rank: use parallel: ddp, "
                              "or logit_impl: full under fsdp")
        return impl

    def forward(self, stage: Stage, model, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        plan = self.plans[stage.name]
        impl = self._impl(plan, model)
        moe = is_moe(model)
        routing = record_router_logits(model) if moe else contextlib.nullcontext([])
        logits = states = None
        with probe(model, batch["attention_mask"], plan.attn_layers, plan.hidden) as pr, routing as router_logits:
            if impl == "full":
                logits = model(**model_inputs(batch)).logits
            else:  # the final hidden states; the LM head is applied inside the fused loss, row chunk by chunk
                states = model.model(**model_inputs(batch)).last_hidden_state
        self._stats = {}
        if moe:
            shares = expert_shares(router_logits, model.config.text_config.num_experts_per_tok,
                                   batch["attention_mask"].bool())
            self._stats = {"moe_load_max": float(shares.max(-1).values.mean()),
                           "moe_load_min": float(shares.min(-1).values.mean())}
        ctx = Step(model, batch, step, pr, logits, states, impl, router_logits, self.proj)
        no_images = not bool(batch["image_mask"].any())
        return {name: ctx.zero() if term.visual and no_images else term.loss(ctx) for name, term in plan.terms}

    def stats(self) -> dict[str, float]:
        return dict(self._stats)


def refuse_cross(stage: str, on: set[str]) -> None:
    """A student with another tokenizer than the cache's: only the terms defined across tokenizers."""
    bad = [n for n in on if n in TERMS and not TERMS[n].cross_ok]
    if bad:
        ok = [cls.name for cls in ORDER if cls.cross_ok]
        raise RecipeError(f"stage {stage}: the student's tokenizer is not the teacher's, and the term(s) {sorted(bad)} "
                          f"read the teacher's token ids or positions (which mean other strings in the student's "
                          f"vocabulary); across tokenizers use {ok} (uld: the logit KD for this case), or give the "
                          "student the teacher's tokenizer")


def cache_facts(reader, cross_tokenizer: bool = False) -> CacheFacts:
    """What the terms check about a cache, from its reader (the Gram array read on demand)."""
    man = reader.manifest
    return CacheFacts(man["extraction"], man["teacher"], gram=reader.gram, cross_tokenizer=cross_tokenizer)
