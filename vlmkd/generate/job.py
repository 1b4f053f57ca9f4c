"""`vlmkd generate`: a model answers the prompts of a manifest and the answers become a manifest.

Each written row is the prompt row in its own format with the generated answer as its last assistant
turn, the id `ID-gJ` (J: which of the n answers) and a `generation` field saying where it came from
(model and its weights' hash, engine, sampling parameters, the row's seed, the prompt row and its id,
why the answer stopped, the data set's answer it replaced). Rows are answered in file order in batches;
after each batch the rows and rejects are flushed and a state file (`OUT stem`.gen.json) records how
far the job got and how many bytes each file holds. A re-run with the same model, data and sampling
truncates the files to those sizes and goes on from there: every prompt is answered exactly once.
The counts add up: rows = prompts answered + rows rejected + rows not asked (`only_rows`), and every
prompt's n answers are either written or recorded as rejects (an empty answer).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vlmkd.cache.manifest import sha256_file, weights_fingerprint
from vlmkd.data.dataset import encode_samples
from vlmkd.data.manifest import Reject, columns_for, read_rows
from vlmkd.errors import DataError
from vlmkd.generate.engines import Sampling, budget, make_engine
from vlmkd.generate.rows import answered_row, replaced_answer
from vlmkd.progress import bar, console

STATE_VERSION = 1


@dataclass
class GenerateJob:
    model: Path
    data: Path
    out: Path  # .jsonl (rows appended as they come), or .json (a JSON list written when the job ends)
    sampling: Sampling = Sampling()
    backend: str = "auto"
    batch_size: int = 64
    strict: bool = False
    overwrite: bool = False
    only_rows: frozenset[int] | None = None  # answer these row numbers only (an on-policy round's share)
    stop_after: int | None = None  # testing: stop as if killed after this many batches
    tensor_parallel_size: int = 1


def paths(out: Path) -> dict[str, Path]:
    """The files one job writes: the rows as they come, the rejects, the state (and the final list)."""
    out = Path(out)
    if out.suffix not in (".jsonl", ".json"):
        raise DataError(f"--out {out}: a manifest file ending in .jsonl (rows appended as they come) or .json "
                        "(a JSON list, written when the job ends)")
    stem = out.parent / out.stem
    rows = out if out.suffix == ".jsonl" else Path(f"{stem}.partial.jsonl")
    return {"rows": rows, "rejects": Path(f"{stem}.rejects.jsonl"), "state": Path(f"{stem}.gen.json"), "out": out}


def fingerprint(job: GenerateJob, engine: str) -> dict:
    """What must agree for a re-run to continue this job's files."""
    chosen = None if job.only_rows is None else hashlib.sha256(
        json.dumps(sorted(job.only_rows)).encode()).hexdigest()
    return {"state_version": STATE_VERSION, "model": str(Path(job.model).resolve()),
            "model_sha256": weights_fingerprint(Path(job.model)), "engine": engine,
            "data": str(Path(job.data).resolve()), "data_sha256": sha256_file(Path(job.data)),
            "sampling": job.sampling.to_dict(), "only_rows_sha256": chosen}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _resume(job: GenerateJob, files: dict[str, Path], fp: dict) -> dict | None:
    """The state to continue from (files truncated to it), a fresh one, or None when already complete."""
    state_file = files["state"]
    fresh = {"fingerprint": fp, "state": "running", "cursor": 0, "bytes": {"rows": 0, "rejects": 0},
             "counts": {"rows": 0, "prompts": 0, "rejected_rows": 0, "not_asked": 0, "answers": 0,
                        "empty_answers": 0, "new_tokens": 0}, "seconds": 0.0}
    if job.overwrite:
        for p in files.values():
            p.unlink(missing_ok=True)
        return fresh
    if not state_file.is_file():
        there = [str(p) for k, p in files.items() if k != "state" and p.exists()]
        if there:
            raise DataError(f"{there[0]} exists but no {state_file.name} says which job wrote it: move it away, or "
                            "pass --overwrite to start over")
        return fresh
    state = json.loads(state_file.read_text())
    if state["fingerprint"] != fp:
        diff = sorted(k for k in fp if state["fingerprint"].get(k) != fp[k])
        raise DataError(f"{state_file}: these answers were written by another job (it differs in {', '.join(diff)}); "
                        "re-run it as it was, write elsewhere, or pass --overwrite to start over")
    if state["state"] == "complete":
        return None
    for key in ("rows", "rejects"):
        p, size = files[key], state["bytes"][key]
        if (p.stat().st_size if p.exists() else 0) < size:
            raise DataError(f"{p} is shorter than {state_file.name} records ({size} bytes): answers were lost; pass "
                            "--overwrite to start over")
        if p.exists():
            with p.open("r+b") as f:  # whatever a killed job wrote after its last recorded batch goes
                f.truncate(size)
    return state


def run_generate(job: GenerateJob, engine=None) -> dict:
    """Run (or resume) one generation job; returns its state (with the counts)."""
    from vlmkd.teacher.job import choose_backend

    files = paths(job.out)
    files["out"].parent.mkdir(parents=True, exist_ok=True)
    rows = list(read_rows(job.data, prompts=True))
    cols, src_root, dst_root = columns_for(Path(job.data)), Path(job.data).parent, files["out"].parent
    name = engine.name if engine is not None else choose_backend(job.backend, Path(job.model), what="generation engine")
    fp = fingerprint(job, name)
    state = _resume(job, files, fp)
    if state is None:
        console.print(f"{files['out']} is complete: nothing to do")
        return json.loads(files["state"].read_text())
    own = engine is None
    engine = engine or make_engine(name, Path(job.model), job.batch_size, job.tensor_parallel_size)
    n_rows, bs, c = len(rows), job.batch_size, state["counts"]
    t0, batches = time.time(), 0
    with bar() as p:
        task = p.add_task(f"generate ({engine.name})", total=n_rows, completed=state["cursor"], unit="rows")
        for b0 in range(state["cursor"], n_rows, bs):
            chunk = range(b0, min(b0 + bs, n_rows))
            lines, rejects = _batch(engine, job, rows, chunk, cols, src_root, dst_root, c, fp["model_sha256"])
            with files["rows"].open("ab") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            with files["rejects"].open("ab") as f:
                f.write(rejects)
                f.flush()
                os.fsync(f.fileno())
            state["cursor"] = chunk[-1] + 1
            state["bytes"] = {k: files[k].stat().st_size for k in ("rows", "rejects")}
            state["seconds"] += time.time() - t0
            t0 = time.time()
            _write_state(files["state"], state)
            el = max(state["seconds"], 1e-9)
            p.update(task, completed=state["cursor"],
                     description=f"generate ({engine.name}) [{c['answers']} answers, {c['new_tokens'] / el:,.0f} new tok/s]")
            batches += 1
            if job.stop_after and batches >= job.stop_after:
                return state
    if own and hasattr(engine, "close"):
        engine.close()
    if c["rows"] != c["prompts"] + c["rejected_rows"] + c["not_asked"]:
        raise DataError(f"{files['state']}: {c['rows']} rows but {c['prompts']} prompts + {c['rejected_rows']} rejected + "
                        f"{c['not_asked']} not asked (a bug: please report it with the state file)")
    if files["out"] != files["rows"]:
        written = [json.loads(line) for line in files["rows"].read_text(encoding="utf-8").splitlines()]
        files["out"].write_text(json.dumps(written, ensure_ascii=False, indent=1), encoding="utf-8")
        files["rows"].unlink()
    state["state"] = "complete"
    _write_state(files["state"], state)
    console.print(f"{files['out']}: {c['answers']} answers to {c['prompts']} prompts ({job.sampling.n} each, "
                  f"{c['empty_answers']} empty); {c['rows']} rows = {c['prompts']} prompts + {c['rejected_rows']} rejected"
                  + (f" + {c['not_asked']} not asked" if c["not_asked"] else "")
                  + (f" (see {files['rejects']})" if c["rejected_rows"] or c["empty_answers"] else ""))
    return state


def _batch(engine, job: GenerateJob, rows: list, chunk: range, cols, src_root: Path, dst_root: Path,
           c: dict, model_sha256: str) -> tuple[bytes, bytes]:
    """The written rows and reject records of one batch of rows (JSONL bytes each); counts updated."""
    s = job.sampling
    rejects, asked = [], []
    for i in chunk:
        raw, sample = rows[i]
        c["rows"] += 1
        if job.only_rows is not None and i not in job.only_rows:
            c["not_asked"] += 1
        elif isinstance(sample, Reject):
            rejects.append({"row": i, "id": sample.sample_id, "source": sample.source, "reason": sample.reason})
        else:
            asked.append((i, raw, sample))
    items, kept = [], []
    for i, raw, sample in asked:
        try:
            (it,) = encode_samples([sample], engine.tok, engine.layout, strict=True, with_answer=False)
            if budget(it, s, engine.layout.max_length) < 1:
                raise DataError(f"sample {sample.id}: the prompt fills the model's context ({len(it.enc.input_ids)} of "
                                f"{engine.layout.max_length} tokens): no room for an answer; shorten it")
            items.append(it)
            kept.append((i, raw, sample))
        except DataError as e:
            if job.strict:
                raise DataError(f"--strict: {e}") from e
            rejects.append({"row": i, "id": sample.id, "source": str(sample.image or job.data), "reason": str(e)})
    c["rejected_rows"] += len(rejects)
    answers = engine.answer(items, [i for i, _, _ in kept], s) if items else []
    out = []
    fp_model = {"model": str(Path(job.model).resolve()), "model_sha256": model_sha256, "engine": engine.name,
                **s.to_dict()}
    for (i, raw, sample), comps in zip(kept, answers, strict=True):
        c["prompts"] += 1
        replaced = replaced_answer(raw, cols)
        for j, comp in enumerate(comps):
            c["new_tokens"] += len(comp.ids)
            if not comp.text:
                c["empty_answers"] += 1
                rejects.append({"row": i, "id": sample.id, "sample": j, "source": str(job.data),
                                "reason": f"answer {j} of sample {sample.id} is empty ({comp.finish})"})
                continue
            c["answers"] += 1
            row = answered_row(raw, cols, comp.text, f"{sample.id}-g{j}", src_root, dst_root)
            row["generation"] = {**fp_model, "row_seed": s.row_seed(i), "sample": j, "prompt_row": i,
                                 "prompt_id": sample.id, "prompt_file": str(Path(job.data).resolve()),
                                 "finish": comp.finish, "new_tokens": len(comp.ids), "replaced": replaced}
            out.append(row)
    encode = lambda rs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs).encode()  # noqa: E731
    return encode(out), encode(rejects)
