"""The training loop: stages, AdamW with warm-up and cosine decay, clipping, accumulation, bf16,
periodic evaluation, checkpoints and exact resume. One readable loop for every recipe: a recipe only
chooses the stages, the trainable parts and the loss terms (the `objective`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmkd.data.dataset import Item, collate, model_inputs, to_device
from vlmkd.data.layout import Layout
from vlmkd.data.manifest import Sample
from vlmkd.data.select import accepts
from vlmkd.data.template import Tokenizer
from vlmkd.errors import DataError, RecipeError
from vlmkd.eval.score import greedy_answers, score
from vlmkd.losses.sft import response_ce
from vlmkd.models.build import save_model
from vlmkd.models.lora import has_lora, merged_state_dict, save_adapters, trainable_llm_parameters
from vlmkd.models.moe import is_moe, upcycle
from vlmkd.models.parts import parts_of
from vlmkd.models.quant import QuantSpec, add_fake_quant, export_quantized, fake_quant_spec, plain_state_dict
from vlmkd.train.checkpoint import find_checkpoint, load_state, save_checkpoint
from vlmkd.train.dist import (
    average_gradients,
    average_logs,
    barrier,
    dist_info,
    full_model_state,
    full_optimizer_state,
    is_main,
    load_full_optimizer_state,
    shard_model,
    train_device,
)
from vlmkd.train.metrics import MetricsLog, plot_run, write_csv
from vlmkd.train.recipe import Recipe, Stage
from vlmkd.train.schedule import lr_factor


class Objective(torch.nn.Module):
    """objective(stage, model, batch, step) -> {term name: scalar tensor}; the loop weights the terms by
    `stage.losses`. Its own parameters (e.g. a learned projection to the teacher's width) train with the
    student and are checkpointed beside it."""

    def forward(self, stage: Stage, model, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        out = model(**model_inputs(batch))
        return {"ce": response_ce(out.logits, batch["input_ids"], batch["labels_mask"])}

    def stats(self) -> dict[str, float]:
        """Numbers to log beside the loss terms (not trained on), from the last forward."""
        return {}


class ItemSource:
    """Batches from in-memory items (a manifest): each stage's epochs are seeded permutations."""

    def __init__(self, items: Sequence[Item], layout: Layout, pad_id: int, seed: int):
        self.items, self.layout, self.pad_id, self.seed = items, layout, pad_id, seed

    def batches(self, si: int, stage: Stage, micro_start: int):
        items = stage_items(self.items, stage)
        if not items:
            raise DataError(f"stage {stage.name}: no samples of kind {stage.data!r} in the training data")
        micro = micro_start
        while True:
            idx = batch_indices(len(items), self.seed, si, micro, stage.batch_size)
            yield collate([items[i] for i in idx], self.layout, self.pad_id)
            micro += 1


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    last_eval: dict | None


def stage_accepts(stage: Stage, sample: Sample) -> bool:
    """Whether an in-memory sample belongs to a stage's data (`vlmkd.data.select`)."""
    return accepts(stage.data, stage.data_field, stage.prompt_regex, sample.extra, sample.question,
                   f"stage {stage.name}")


def stage_items(items: Sequence[Item], stage: Stage) -> list[Item]:
    return [it for it in items if stage_accepts(stage, it.sample)]


def batch_indices(n: int, seed: int, stage_idx: int, step: int, batch: int) -> list[int]:
    """The sample indices of optimizer micro-batch `step`: epochs are seeded permutations, so the
    position in the data is a function of the step alone (what makes resume exact)."""
    out = []
    start = step * batch
    for k in range(start, start + batch):
        epoch, pos = divmod(k, n)
        out.append(int(_epoch_order(n, seed, stage_idx, epoch)[pos]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, stage_idx: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage_idx, epoch]).permutation(n)


def set_trainable(model, parts: list[str]) -> list[torch.nn.Parameter]:
    """Freeze all but the named parts; a LoRA student's `llm` part is its adapters only."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, mod in parts_of(model).items():
        if name in parts:
            for p in (trainable_llm_parameters(mod) if name == "llm" and has_lora(model) else mod.parameters()):
                if not p.requires_grad:  # (a connector inside the tower's module is in both groups)
                    p.requires_grad_(True)
                    params.append(p)
    return params


def stage_optimizer(model, objective, stage: Stage) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The stage's trainable parameters (its parts and the objective's learned maps) and their AdamW."""
    params = set_trainable(model, stage.trainable) + list(objective.parameters())
    return params, torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.98))


def weighted_total(stage: Stage, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stage's loss: its terms times their recipe weights."""
    return sum(stage.losses.get(k, 1.0) * v for k, v in terms.items())


def export_weights(model, fsdp: bool) -> dict | None:
    """The weights a saved model gets: gathered under FSDP, fake-quantised baked (QAT), adapters
    merged (LoRA); None when the model's own state dict is it."""
    weights = full_model_state(model) if fsdp else plain_state_dict(model, baked=True)
    return merged_state_dict(model, weights) if has_lora(model) else weights


def save_export(model, hf_tok, out: Path, adapters: Path | None, fsdp: bool = False) -> Path:
    """The student as a plain checkpoint (`export_weights`), and a LoRA student's adapters alone in
    `adapters`. Under FSDP every rank calls it (the gather) and rank 0 writes."""
    weights = export_weights(model, fsdp)
    if is_main():
        save_model(model, hf_tok, out, state_dict=weights)
        if has_lora(model) and adapters is not None:
            save_adapters(model, adapters)
    return Path(out)


def evaluate(model, items: Sequence[Item], layout: Layout, tok: Tokenizer, batch_size: int = 64) -> dict:
    """Held-out NLL of the reference answers (per response token) and greedy accuracy on `items`."""
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            b = to_device(collate(items[s : s + batch_size], layout, tok.pad_id), next(model.parameters()).device)
            k = int(b["labels_mask"][:, 1:].sum())
            nll += float(response_ce(model(**model_inputs(b)).logits, b["input_ids"], b["labels_mask"])) * k
            n += k
    res = {"val_nll": nll / max(1, n)}
    if items:
        sc = score(items, greedy_answers(model, items, layout, tok))
        res["val_accuracy"] = sc["accuracy"]
        res.update({f"val_acc_{t}": v["accuracy"] for t, v in sc["per_type"].items()})
    model.train()
    return res


def train(
    recipe: Recipe,
    model,
    hf_tok,
    tok: Tokenizer,
    layout: Layout,
    source,
    val_items: Sequence[Item],
    run_dir: str | Path,
    objective: Objective | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    progress=None,
    stop_after: int | None = None,
    model_out: str | Path | None = None,
) -> TrainResult:
    """Run every stage of `recipe`; `max_steps` caps each stage; `stop_after` stops the whole run
    after that many optimizer steps (to test resume). `source.batches(stage_index, stage, micro_step)`
    yields the training batches from any position, which is what makes resume exact."""
    objective = objective if objective is not None else Objective()
    device = train_device()  # this rank's GPU when there is one; the fused KD kernels follow the model there
    model.to(device)
    objective.to(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    start_stage, start_step, global_step = 0, 0, 0
    ckpt = find_checkpoint(run_dir) if resume else None
    state = None
    if ckpt is not None:
        state = load_state(ckpt)
        if _checkpoint_is_moe(ckpt) and not is_moe(model):  # the run had upcycled before it stopped
            model = _upcycled(model, next(st for st in recipe.stages if st.upcycle), device)
        model.load_state_dict(_load_weights(ckpt, raw=has_lora(model)), strict=True)  # full weights, before sharding
        if (ckpt / "objective.pt").is_file():
            objective.load_state_dict(torch.load(ckpt / "objective.pt", weights_only=True, map_location=device))
        start_stage, start_step, global_step = state["stage_index"], state["stage_step"], state["global_step"]
    fsdp = recipe.parallel == "fsdp" and dist_info()[1] > 1
    if fsdp and any(st.upcycle for st in recipe.stages):
        raise RecipeError("upcycling a student mid-run is not supported under FSDP; run that recipe with ddp")
    if fsdp and any(st.qat for st in recipe.stages):
        raise RecipeError("quantisation-aware training is not supported under FSDP; run that recipe with ddp")
    if fsdp:
        shard_model(model)
    # the model and the loss-side modules, for optimizer state keyed by parameter name (any world size)
    holder = torch.nn.ModuleDict({"model": model, "objective": objective})
    main = is_main()  # rank 0 writes metrics, checkpoints and models
    evaluates = main or fsdp  # a sharded model's forward needs every rank
    barrier()  # every rank has read the checkpoint before rank 0 may replace it
    if main:
        metrics = MetricsLog(run_dir, resume_step=global_step)
        (run_dir / "recipe.json").write_text(json.dumps(_recipe_dict(recipe), indent=1))
    use_bf16 = recipe.dtype == "bfloat16"
    t0 = time.time()
    last_eval = None
    done_steps = 0
    model.train()
    for si, stage in enumerate(recipe.stages):
        if si < start_stage:
            continue
        total = min(stage.steps, max_steps) if max_steps else stage.steps
        if stage.upcycle and not is_moe(model):
            model = _upcycled(model, stage, device)
            holder = torch.nn.ModuleDict({"model": model, "objective": objective})
        qat = next((QuantSpec.parse(st.qat) for st in recipe.stages[: si + 1] if st.qat), None)
        if qat is not None and fake_quant_spec(model) is None:  # from the first qat stage on (also on resume)
            add_fake_quant(model, qat)
        params, opt = stage_optimizer(model, objective, stage)
        first = start_step if si == start_stage else 0
        if state is not None and si == start_stage and first > 0:
            load_full_optimizer_state(holder, opt, torch.load(ckpt / "optimizer.pt", weights_only=True,
                                                              map_location="cpu"))
        val = list(val_items[: recipe.eval_samples])
        task = (progress.add_task(f"{recipe.name}:{stage.name}", total=total, completed=first, unit="steps")
                if progress else None)
        stream = source.batches(si, stage, first * stage.grad_accum)
        for step in range(first, total):
            t_step = time.perf_counter()  # data + forward + backward + update: what a step costs
            lr = stage.lr * lr_factor(step, total, stage.warmup, stage.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            logs: dict[str, float] = {}
            for _ in range(stage.grad_accum):
                batch = to_device(next(stream), device)
                ctx = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with ctx:
                    terms = objective(stage, model, batch, step)
                loss = weighted_total(stage, terms)
                (loss / stage.grad_accum).backward()
                for k, v in terms.items():
                    logs[f"loss_{k}"] = logs.get(f"loss_{k}", 0.0) + float(v.detach()) / stage.grad_accum
                for k, v in objective.stats().items():
                    logs[k] = logs.get(k, 0.0) + v / stage.grad_accum
                logs["loss"] = logs.get("loss", 0.0) + float(loss.detach()) / stage.grad_accum
            average_gradients(params)  # no-op in one process
            logs = average_logs(logs)
            gnorm = torch.nn.utils.clip_grad_norm_(params, stage.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_seconds = time.perf_counter() - t_step
            global_step += 1
            done_steps += 1
            if main and (step % recipe.log_every == 0 or step == total - 1):
                metrics.write({"kind": "train", "step": global_step, "stage": stage.name, "lr": lr,
                               "grad_norm": float(gnorm), "time": time.time() - t0, "step_seconds": step_seconds,
                               **logs})
            if progress:
                progress.update(task, advance=1)
            last = step == total - 1
            if evaluates and ((step + 1) % recipe.eval_every == 0 or last):
                last_eval = evaluate(model, val, layout, tok)
                if main:
                    metrics.write({"kind": "eval", "step": global_step, "stage": stage.name, **last_eval})
            if (step + 1) % recipe.save_every == 0 or last or (stop_after and done_steps >= stop_after):
                nxt = (si, step + 1) if not last else (si + 1, 0)
                # gathered on every rank (collectives under FSDP), written by rank 0
                # the float master weights under plain names when fake quantisation is on (else None)
                weights = full_model_state(model) if fsdp else plain_state_dict(model)
                opt_state = full_optimizer_state(holder, opt)
                if main:
                    save_checkpoint(run_dir, model, hf_tok, opt, {"stage_index": nxt[0], "stage_step": nxt[1],
                                                                  "global_step": global_step, "stage": stage.name},
                                    objective.state_dict(), model_state=weights, optimizer_state=opt_state)
            if stop_after and done_steps >= stop_after:
                return TrainResult(run_dir, run_dir / "checkpoint", global_step, time.time() - t0, last_eval)
        save_export(model, hf_tok, run_dir / f"stage_{si}_{stage.name}", None, fsdp)
        state = None
    model_dir = Path(model_out or run_dir / "model")
    # a QAT student is saved as it computes (fake-quantised weights, in floats) and exported with
    # real integer weights beside it, whose accuracy is logged as kind "eval_export"
    save_export(model, hf_tok, model_dir, run_dir / "lora", fsdp)
    if main:
        if (spec := fake_quant_spec(model)) is not None:
            exported = export_quantized(model, spec, hf_tok, model_dir.with_name(f"{model_dir.name}_{spec.tag}"))
            metrics.write({"kind": "eval_export", "step": global_step, "stage": recipe.stages[-1].name,
                           "export": str(exported), **evaluate(_loaded(exported, device), val_items[: recipe.eval_samples],
                                                               layout, tok)})
        write_csv(run_dir)
        plot_run(run_dir)
    barrier()
    return TrainResult(run_dir, model_dir, global_step, time.time() - t0, last_eval)


def _checkpoint_is_moe(ckpt: Path) -> bool:
    cfg = json.loads((ckpt / "config.json").read_text())
    return cfg.get("text_config", {}).get("model_type") == "mixtral"


def _upcycled(model, stage: Stage, device):
    """LLaVA-MoD's dense-to-sparse step: the dense LLM's FFNs become experts (vlmkd.models.moe)."""
    u = stage.upcycle
    moe = upcycle(model, experts=u.get("experts", 4), top_k=u.get("top_k", 2), aux_coef=u.get("aux_coef", 0.01),
                  seed=u.get("seed", 0))
    return moe.to(device)


def _loaded(model_dir: Path, device):
    from vlmkd.models.build import load_model

    return load_model(model_dir)[0].to(device)


def _load_weights(ckpt: Path, raw: bool = False) -> dict:
    """The checkpoint's weights named as the in-memory modules name them: read through transformers,
    which maps the names it writes (e.g. Mixtral's per-expert tensors) back to its current layout;
    `raw`: the file's tensors as written (a LoRA student's `base_layer` / `lora_*` names, which a plain
    transformers model would drop)."""
    if raw:
        from safetensors.torch import load_file

        out = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    from vlmkd.models.build import load_model

    return load_model(ckpt)[0].state_dict()


def _recipe_dict(recipe: Recipe) -> dict:
    from dataclasses import asdict

    return asdict(recipe)
