"""`vlmkd on-policy`: GKD's on-policy distillation, done offline in rounds.

A recipe's `on_policy:` section says how many rounds, which share of the prompts the student answers
itself each round (`fraction`; the rest keep the data set's answers: GKD's mix of on- and off-policy
data) and how it samples. Round 0 trains the student from the teacher's cache of the data set (the
ordinary `train-student`). Round r (1..R), each step in its own folder OUT/round-r/, kept:
  1. `answers.jsonl`: the previous round's student answers its share of the prompts (`vlmkd generate`);
  2. `data.jsonl`: those answers, and the data set's own rows for the other prompts;
  3. `cache/`: the teacher scores that manifest (`cache-teacher`, with the base cache's settings);
  4. `student/`: the student goes on training from its last weights with the recipe's stages.
Teacher and student are never in memory together; every step is resumable and skipped when complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import yaml

from vlmkd.cache.reader import CacheReader
from vlmkd.data.manifest import Reject, columns_for, read_rows
from vlmkd.errors import RecipeError
from vlmkd.generate.engines import Sampling
from vlmkd.generate.job import GenerateJob, run_generate
from vlmkd.generate.rows import rebased_row
from vlmkd.progress import console
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train.recipe import load_recipe


@dataclass(frozen=True)
class OnPolicy:
    rounds: int = 1
    fraction: float = 0.5  # the share of prompts the student answers itself each round (GKD's lambda)
    n: int = 1
    temperature: float = 1.0  # the student samples (GKD); 0: its greedy answers
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    seed: int | None = None  # the draws of rows and answers (default: the run's seed)
    backend: str = "auto"  # the student's generation engine
    teacher_backend: str = "auto"  # the teacher's scoring backend
    # the stages each round 1..R trains (default: the recipe's, which round 0 trains), e.g. KD terms
    # only, so that no cross-entropy pulls the student towards its own sampled answers
    stages: list | None = None

    @classmethod
    def parse(cls, raw: dict | None, where: str) -> OnPolicy:
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: on_policy is a mapping (rounds, fraction, temperature, ...)")
        names = {f.name for f in fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise RecipeError(f"{where}: unknown on_policy key(s) {sorted(unknown)}; known: {sorted(names)}")
        op = cls(**raw)
        if not isinstance(op.rounds, int) or op.rounds < 1:
            raise RecipeError(f"{where}: on_policy.rounds must be a whole number, 1 or more")
        if not 0 < op.fraction <= 1:
            raise RecipeError(f"{where}: on_policy.fraction is the share of prompts the student answers, in (0, 1]")
        op.sampling(0)  # refuses bad sampling parameters now, not after round 0
        if op.stages is not None:
            from vlmkd.train.recipe import parse_recipe

            parse_recipe({"model": {}, "stages": op.stages}, f"{where} on_policy")  # refuses a bad stage now
        return op

    def sampling(self, round_: int, seed: int = 0) -> Sampling:
        return Sampling(self.n, self.temperature, self.top_p, self.top_k, self.max_new_tokens, seed * 1000 + round_)


def round_recipe(recipe, model: dict, path: Path, stages: list | None = None) -> Path:
    """The recipe of one round as a file: the run's settings, the round's stages (default the recipe's)
    and its starting model."""
    raw = {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.name not in ("source", "on_policy", "stages")}
    raw["model"] = model
    raw["stages"] = stages if stages is not None else [asdict(st) for st in recipe.stages]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def on_policy_rows(n_rows: int, fraction: float, seed: int, round_: int) -> frozenset[int]:
    """Which rows the student answers in a round: a seeded draw of round(fraction * rows), new each round."""
    k = max(1, round(fraction * n_rows))
    return frozenset(np.random.default_rng([seed, round_]).choice(n_rows, size=k, replace=False).tolist())


def mixed_manifest(data: Path, answers: Path, chosen: frozenset[int], out: Path) -> dict:
    """The round's data: for each row of the data set in order, the student's answers when the row is
    on-policy, else the row itself (its images re-pointed from `out`'s folder)."""
    by_row: dict[int, list[str]] = {}
    for line in answers.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_row.setdefault(row["generation"]["prompt_row"], []).append(line)
    cols, lines, counts = columns_for(data), [], {"on_policy": 0, "off_policy": 0, "unanswered": 0}
    for i, (raw, sample) in enumerate(read_rows(data)):
        if i in chosen:
            got = by_row.get(i, [])
            counts["on_policy"] += len(got)
            counts["unanswered"] += not got  # a rejected prompt (recorded in the answers' rejects file)
            lines += got
        elif not isinstance(sample, Reject):
            counts["off_policy"] += 1
            lines.append(json.dumps(rebased_row(raw, cols, data.parent, out.parent), ensure_ascii=False))
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return counts


def run_rounds(recipe_path: Path, teacher: Path, cache: str, out: Path, data: Path | None = None,
               max_steps: int | None = None, seed: int | None = None) -> dict:
    from vlmkd.train.student import train_student_run, validation_manifest

    recipe = load_recipe(recipe_path)
    if recipe.on_policy is None:
        raise RecipeError(f"{recipe_path} has no on_policy section (rounds, fraction, ...): nothing to do on-policy; "
                          "train it with `vlmkd train-student`")
    op = OnPolicy.parse(recipe.on_policy, str(recipe_path))
    base = CacheReader(cache, payloads=(), verify=False).manifest
    data = Path(data or base["data"]["manifest"])
    if not data.is_file():
        raise RecipeError(f"the data manifest {data} the cache was built from is not here: pass --data MANIFEST")
    val = validation_manifest(Path(cache), base)
    settings = Extraction(**{k: v for k, v in base["extraction"].items() if k in {f.name for f in fields(Extraction)}})
    n_rows = sum(1 for _ in read_rows(data))
    out = Path(out)
    summary = {"recipe": str(recipe_path), "teacher": str(teacher), "base_cache": str(cache), "data": str(data),
               "on_policy": asdict(op), "rounds": []}

    def train(rnd: Path, model: dict, round_cache, stages=None) -> Path:
        student = rnd / "student"
        if not (student / "model" / "config.json").is_file():
            train_student_run(round_recipe(recipe, model, rnd / "recipe.yaml", stages), round_cache, student, val=val,
                              max_steps=max_steps, seed=seed)
        return student / "model"

    gseed = op.seed if op.seed is not None else seed if seed is not None else recipe.seed
    model = train(out / "round-0", recipe.model, cache)
    summary["rounds"].append({"round": 0, "cache": str(cache), "student": str(model)})
    for r in range(1, op.rounds + 1):
        rnd = out / f"round-{r}"
        chosen = on_policy_rows(n_rows, op.fraction, gseed, r)
        console.print(f"round {r}/{op.rounds}: the student answers {len(chosen)} of {n_rows} prompts")
        gen = run_generate(GenerateJob(model, data, rnd / "answers.jsonl", op.sampling(r, gseed), op.backend,
                                       only_rows=chosen))
        counts = mixed_manifest(data, rnd / "answers.jsonl", chosen, rnd / "data.jsonl")
        round_cache = rnd / "cache"
        run_cache_job(CacheJob(teacher, rnd / "data.jsonl", round_cache, settings, op.teacher_backend, val=val))
        model = train(rnd, {"path": str(model)}, round_cache, op.stages)
        summary["rounds"].append({"round": r, "answers": str(rnd / "answers.jsonl"), "generation": gen["counts"],
                                  "data": counts, "cache": str(round_cache), "student": str(model)})
    (out / "rounds.json").write_text(json.dumps(summary, indent=1))
    console.print(f"on-policy: {op.rounds} round(s); the last student is {model}; rounds in {out / 'rounds.json'}")
    return summary
