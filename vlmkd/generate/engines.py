"""Answering prompts: the same sampling through vLLM or transformers `generate`.

Both engines take the prompt token ids vlmkd's data path makes (the ones the teacher scores and the
student trains on) and return the new token ids up to the model's end-of-turn marker, so a generated
answer is re-tokenised by nothing but its own decode. At temperature 0 both are greedy and give the
same answers (tested). Sampling is seeded per prompt row (`Sampling.row_seed`): a row's answers do
not depend on which other rows share its batch, so a resumed job writes what an uninterrupted one would;
the two engines draw from different random streams, so sampled answers differ between them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmkd.data.dataset import Item, collate, model_inputs
from vlmkd.errors import DataError


@dataclass(frozen=True)
class Sampling:
    """How each prompt is answered: `n` answers, sampled at `temperature` (0: greedy) with nucleus
    `top_p` and `top_k` (0: off), at most `max_new_tokens` each (fewer where the model's context ends)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise DataError(f"--n {self.n}: at least one answer per prompt")
        if self.temperature < 0:
            raise DataError(f"--temperature {self.temperature}: 0 (greedy) or more")
        if self.temperature == 0 and self.n > 1:
            raise DataError(f"--n {self.n} at temperature 0 would write {self.n} identical greedy answers per prompt: "
                            "sample (--temperature > 0) or ask for one")
        if not 0 < self.top_p <= 1:
            raise DataError(f"--top-p {self.top_p}: in (0, 1]")
        if self.top_k < 0:
            raise DataError(f"--top-k {self.top_k}: 0 (off) or a positive count")
        if self.max_new_tokens < 1:
            raise DataError(f"--max-new-tokens {self.max_new_tokens}: at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def row_seed(self, row: int) -> int:
        """The seed of one prompt row: (job seed, row number) hashed, so rows and jobs draw apart."""
        return int(np.random.SeedSequence([self.seed, row]).generate_state(1)[0])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    ids: list[int]  # new tokens, without the end-of-turn marker
    text: str  # decoded and stripped
    finish: str  # "stop" (the end-of-turn marker) or "length" (the token budget ran out)


def budget(it: Item, sampling: Sampling, max_length: int) -> int:
    """New tokens this prompt may have: the asked number, or what is left of the model's context."""
    return min(sampling.max_new_tokens, max_length - len(it.enc.input_ids))


def completion(ids: list[int], tok) -> Completion:
    """New tokens cut at the end-of-turn marker (`stop`), or all of them when the budget ran out (`length`)."""
    stop = tok.eou_id in ids
    ids = ids[: ids.index(tok.eou_id)] if stop else list(ids)
    return Completion(ids, tok.decode(ids).strip(), "stop" if stop else "length")


class HFEngine:
    """transformers `generate` on the model's own forward: greedy prompts batched by length (no
    padding, so a batch gives what one-prompt calls give); sampled prompts one at a time, seeded."""

    name = "hf"

    def __init__(self, model_dir: Path, batch_size: int = 64):
        from vlmkd.models.build import data_tokenizer, load_model

        self.model, hf_tok = load_model(model_dir)
        self.model.eval()
        self.tok, self.layout = data_tokenizer(self.model, hf_tok)
        self.batch_size = batch_size

    @torch.no_grad()
    def answer(self, items: list[Item], rows: list[int], sampling: Sampling) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in items]
        if sampling.greedy:
            groups = defaultdict(list)
            for i, it in enumerate(items):
                groups[len(it.enc.input_ids)].append(i)
            for _, idx in sorted(groups.items()):
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s: s + self.batch_size]
                    for i, ids in zip(chunk, self._generate([items[i] for i in chunk], sampling), strict=True):
                        out[i] = [completion(ids, self.tok)]
            return out
        for i, (it, row) in enumerate(zip(items, rows, strict=True)):
            torch.manual_seed(sampling.row_seed(row))
            out[i] = [completion(ids, self.tok) for ids in self._generate([it], sampling)]
        return out

    def _generate(self, items: list[Item], sampling: Sampling) -> list[list[int]]:
        batch = collate(items, self.layout, self.tok.pad_id, prompt_only=True)
        kw = dict(do_sample=False) if sampling.greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            num_return_sequences=sampling.n)
        gen = self.model.generate(**model_inputs(batch), max_new_tokens=budget(items[0], sampling, self.layout.max_length),
                                  eos_token_id=self.tok.eou_id, pad_token_id=self.tok.pad_id, **kw)
        return gen[:, batch["input_ids"].shape[1]:].tolist()

    def close(self) -> None:
        del self.model


class VLLMEngine:
    """vLLM's engine: every prompt of a batch in one `generate` call, each with its own seeded
    sampling parameters; the prompt vLLM expands must equal vlmkd's ids (checked per prompt)."""

    name = "vllm"

    def __init__(self, model_dir: Path, tensor_parallel_size: int = 1):
        from transformers import AutoConfig, AutoTokenizer

        from vlmkd.data.template import Tokenizer
        from vlmkd.models.build import layout_of
        from vlmkd.teacher.vllm_backend import start_engine

        hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.layout = layout_of(AutoConfig.from_pretrained(str(model_dir)), hf_tok)
        self.tok = Tokenizer(hf_tok, self.layout.image_block, self.layout.image_token_id, self.layout.max_length)
        self.llm = start_engine(model_dir, self.layout, 1, tensor_parallel_size)

    def answer(self, items: list[Item], rows: list[int], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        from vlmkd.teacher.vllm_backend import check_prompt, engine_prompt

        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, max_tokens=budget(it, sampling, self.layout.max_length),
                                 seed=None if sampling.greedy else sampling.row_seed(row),
                                 stop_token_ids=[self.tok.eou_id], detokenize=False)
                  for it, row in zip(items, rows, strict=True)]
        outs = self.llm.generate([engine_prompt(it, self.layout) for it in items], params, use_tqdm=False)
        result = []
        for it, o in zip(items, outs, strict=True):
            check_prompt(it, o.prompt_token_ids)
            result.append([completion(list(c.token_ids), self.tok) for c in sorted(o.outputs, key=lambda c: c.index)])
        return result

    def close(self) -> None:
        from vlmkd.teacher.vllm_backend import stop_engine

        stop_engine(self.llm)
        del self.llm


def make_engine(name: str, model_dir: Path, batch_size: int = 64, tensor_parallel_size: int = 1):
    """`auto`: vLLM when it imports and runs the model here, else transformers, saying which and why."""
    from vlmkd.teacher.job import choose_backend

    if choose_backend(name, Path(model_dir), what="generation engine") == "vllm":
        return VLLMEngine(model_dir, tensor_parallel_size)
    return HFEngine(model_dir, batch_size)
