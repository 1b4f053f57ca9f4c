"""vlmkd inside the loops people already run: a cache's batches, the KD loss of a recipe stage, and a
`transformers.Trainer` that trains a student from a cache with the user's `TrainingArguments`.

    from vlmkd.hf_trainer import KDTrainer, kd_arguments
    from vlmkd.train.student import prepare_student

    run = prepare_student("pipelines/mdist.yaml", "demo/cache")
    trainer = KDTrainer(run, stage="kd", args=kd_arguments(run, "kd", "out"))
    trainer.train()
    save_student(run, "out/student")  # plain weights (a LoRA student's adapters merged, and kept in lora/)

The pieces, for other loops: `StageBatches` (a torch IterableDataset of whole student batches of one
stage: the cache's seeded stream, dealt by rank, resumable at any micro-step: the batches vlmkd's own
loop sees), `KDLoss` (a stage's terms and weights: the weighted total and each term), and
`kd_optimizer` (AdamW and the warm-up + cosine schedule as vlmkd's loop builds them). vlmkd's own loop
stays the reference: the same stage, seed and data give the same loss curve through the Trainer
(tests/test_hf_trainer.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from vlmkd.errors import RecipeError
from vlmkd.train.dist import average_gradients, init_from_env
from vlmkd.train.loop import save_export, stage_optimizer, weighted_total
from vlmkd.train.recipe import Stage
from vlmkd.train.schedule import lr_factor


def _stage(run, stage: str | int) -> tuple[int, Stage]:
    stages = run.recipe.stages
    if isinstance(stage, int):
        return stage, stages[stage]
    for i, st in enumerate(stages):
        if st.name == stage:
            return i, st
    raise RecipeError(f"no stage {stage!r} in recipe {run.recipe.name}; it has {[st.name for st in stages]}")


OBJECTIVE_FILE = "vlmkd_objective.pt"  # the learned maps (and buffers) of the stage's terms, per checkpoint


class StageBatches(torch.utils.data.IterableDataset):
    """Whole student batches of one recipe stage from the run's cache (`CacheSource.batches`), from
    micro-step `start` on; iterate it with `DataLoader(..., batch_size=None)`."""

    def __init__(self, run, stage: str | int, start: int = 0):
        self.run, (self.index, self.stage), self.start = run, _stage(run, stage), start

    def __iter__(self):
        return self.run.source.batches(self.index, self.stage, self.start)


class KDLoss(torch.nn.Module):
    """A recipe stage's terms: `forward(model, batch, step)` -> (weighted total, {term: value})."""

    def __init__(self, run, stage: str | int):
        super().__init__()
        self.objective = run.objective  # holds the learned maps: train them with the student
        _, self.stage = _stage(run, stage)

    def forward(self, model, batch: dict, step: int = 0):
        terms = self.objective(self.stage, model, batch, step)
        return weighted_total(self.stage, terms), terms


def kd_optimizer(run, stage: str | int, total_steps: int | None = None):
    """AdamW over the stage's trainable parts and the objective's maps, and the LR schedule (warm-up,
    then cosine to `min_lr_ratio`), exactly as vlmkd's loop makes them."""
    _, st = _stage(run, stage)
    _, opt = stage_optimizer(run.model, run.objective, st)
    total = total_steps or st.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, total, st.warmup, st.min_lr_ratio))
    return opt, sched


def kd_arguments(run, stage: str | int, output_dir: str, **overrides) -> TrainingArguments:
    """TrainingArguments that mirror the stage (steps, clipping, accumulation, bf16); anything else is
    the user's (`overrides`)."""
    _, st = _stage(run, stage)
    init_from_env()  # under torchrun / accelerate launch: the process group (gloo on the CPU) before accelerate
    kw = dict(output_dir=str(output_dir), max_steps=st.steps, max_grad_norm=st.clip,
              gradient_accumulation_steps=st.grad_accum, logging_steps=1, report_to=[], save_strategy="no",
              bf16=run.recipe.dtype == "bfloat16", seed=run.recipe.seed, use_cpu=not torch.cuda.is_available(),
              remove_unused_columns=False, dataloader_num_workers=0, ddp_find_unused_parameters=False,
              ddp_backend="gloo" if torch.distributed.is_initialized() and not torch.cuda.is_available() else None)
    return TrainingArguments(**{**kw, **overrides})


def save_student(run, out) -> Path:
    """The trained student as a plain checkpoint transformers and vLLM load (QAT baked, LoRA merged;
    a LoRA student's adapters also in OUT/lora/), with its tokenizer and processor."""
    return save_export(run.model, run.hf_tok, Path(out), Path(out) / "lora")


class _ZeroMapGrads(TrainerCallback):
    """The objective's learned maps are not part of the model: their gradients are cleared after
    each optimizer step, as the model's are (else they would add up across steps)."""

    def __init__(self, loss: KDLoss):
        self.loss = loss

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002 - the callback's signature
        self.loss.zero_grad(set_to_none=True)


class KDTrainer(Trainer):
    """`transformers.Trainer` over a vlmkd cache: the batches of one recipe stage, its KD terms as the
    loss (each term logged as `loss_TERM`), vlmkd's optimizer and schedule unless others are given,
    and the gradient norm clipped over the student and the objective's learned maps together."""

    def __init__(self, run, stage: str | int, args: TrainingArguments, optimizers=(None, None), **kwargs):
        self.run = run
        self.kd_index, self.kd_stage = _stage(run, stage)
        self.kd_loss = KDLoss(run, stage)
        if args.max_grad_norm <= 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise RecipeError("KDTrainer under several processes averages the learned maps' gradients where it "
                              "clips: set max_grad_norm > 0 (kd_arguments takes the stage's clip)")
        if optimizers == (None, None):
            optimizers = kd_optimizer(run, stage, args.max_steps if args.max_steps > 0 else None)
        super().__init__(model=run.model, args=args, optimizers=optimizers, **kwargs)
        self.kd_loss.to(self.args.device)
        self.add_callback(_ZeroMapGrads(self.kd_loss))  # Trainer zeroes the model's gradients only
        self._term_logs: dict[str, list[float]] = {}

    def get_train_dataloader(self):
        # whole batches in the cache's seeded order, dealt by rank inside CacheSource (under DDP too)
        return torch.utils.data.DataLoader(StageBatches(self.run, self.kd_index), batch_size=None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self.model:  # DDP's wrapper: forward through it (gradient sync), read the rest inside
            model = _Wrapped(model, self.model)
        total, terms = self.kd_loss(model, inputs, self.state.global_step)
        for k, v in terms.items():
            self._term_logs.setdefault(f"loss_{k}", []).append(float(v.detach()))
        return (total, terms) if return_outputs else total

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._term_logs:
            logs.update({k: sum(v) / len(v) for k, v in self._term_logs.items()})
            self._term_logs = {}
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # the learned maps live beside the model: saved with every checkpoint, read back on resume
        if self.args.should_save:
            torch.save(self.kd_loss.objective.state_dict(), Path(output_dir or self.args.output_dir) / OBJECTIVE_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / OBJECTIVE_FILE
        if not path.is_file():
            raise RecipeError(f"{resume_from_checkpoint} has no {OBJECTIVE_FILE}: not a KDTrainer checkpoint")
        self.kd_loss.objective.load_state_dict(torch.load(path, weights_only=True, map_location=self.args.device))

    def _clip_grad_norm(self, model):
        # the learned maps are outside DDP's wrapper: their gradients are averaged over ranks here, as
        # vlmkd's loop averages everything, before the one clip over student and maps together
        maps = [p for p in self.kd_loss.parameters() if p.requires_grad]
        average_gradients(maps)
        params = [p for p in model.parameters() if p.requires_grad] + maps
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)


class _Wrapped:
    """A distributed wrapper seen as the model it wraps: calls go through the wrapper (so DDP syncs
    the gradients), attributes (config, parts, LM head) come from the model. The objective then takes
    the full-logits path: the fused one calls the inner model directly, which would bypass the sync."""

    _vlmkd_wrapped = True

    def __init__(self, wrapper, module):
        self._wrapper, self._module = wrapper, module

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)
