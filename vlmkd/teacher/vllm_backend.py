"""The vLLM teacher backend: top-k prompt log-probs at inference-engine speed.

Each sample goes to vLLM as the token ids the cache's data path made (the image block collapsed to one
`<image>` placeholder, which vLLM's Idefics3/LLaVA processor expands again), with its image, in one
`generate` call per batch with `max_tokens=1` and `prompt_logprobs=k`. vLLM's expanded prompt must
equal the cache's ids token for token, or the job stops naming the sample. The tail mass is
log(1 - sum of the top-k probabilities).

What vLLM does not return (shallow-layer attention, visual hidden states) comes from a transformers
pass in the same job, truncated to the deepest layer asked for (a first-layer pass for Align-KD; a full
pass only when the `final` hidden point is asked). The manifest records which backend made what.
"""

from __future__ import annotations

import importlib
import math
import os
import re

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from vlmkd.cache import format as fmt
from vlmkd.data.dataset import Item
from vlmkd.data.images import load_image
from vlmkd.errors import CacheError
from vlmkd.models.build import config_data_tokenizer, saved_processor
from vlmkd.teacher.hf_backend import Extraction, HFTeacher, keep_top_p, sample_head, scored_positions

# the architectures vlmkd's vLLM backend drives, and the vLLM module that implements each
SUPPORTED = {"Idefics3ForConditionalGeneration": "idefics3", "LlavaForConditionalGeneration": "llava",
             "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
             "Qwen3VLForConditionalGeneration": "qwen3_vl", "InternVLForConditionalGeneration": "interns1",
             "LlavaNextForConditionalGeneration": "llava_next", "LlavaOnevisionForConditionalGeneration": "llava_onevision",
             "SmolVLMForConditionalGeneration": "smolvlm", "Mistral3ForConditionalGeneration": "mistral3",
             "Gemma3ForConditionalGeneration": "gemma3_mm"}
MAX_IMAGES = 4  # images per prompt a processor family's engine takes (vLLM profiles memory for that many)
# architectures whose attention vLLM's CPU backend does not compute as the model does (checked, per family,
# by tests/test_vllm.py's family parity test)
CPU_OTHERWISE = {"Gemma3ForConditionalGeneration":
                 "vLLM's CPU attention has no bidirectional attention within an image (Gemma 3's `mm_prefix`: "
                 "FlexAttention and Triton only), so it scores the image tokens causally (log-probs off by up to 0.11)"}
# families whose several-image samples vLLM reads otherwise than transformers (so it would score other tokens)
ONE_IMAGE = {"llava_onevision": "vLLM's LLaVA-OneVision tiles every image of a several-image prompt (anyres), "
                                "transformers' reads them as base views only"}


def vllm_available(model_dir) -> tuple[bool, str]:
    """(usable, why): vLLM imports, vlmkd drives the model's architecture, and vLLM's module for it
    imports here (checked, not assumed: vLLM's LLaVA needs torchvision, which the CPU install lacks)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (e.g. a torchvision mismatch)
        return False, f"vLLM does not import here ({type(e).__name__}: {str(e)[:120]})"
    arch = (AutoConfig.from_pretrained(str(model_dir)).architectures or ["?"])[0]
    if arch not in SUPPORTED:
        return False, f"vLLM backend not wired for {arch} (supported: {sorted(SUPPORTED)})"
    if arch in CPU_OTHERWISE and not torch.cuda.is_available():
        return False, f"{CPU_OTHERWISE[arch]}; on a GPU vLLM picks an attention backend that has it (not tested here)"
    try:
        importlib.import_module(f"vllm.model_executor.models.{SUPPORTED[arch]}")
    except Exception as e:
        return False, (f"vLLM's {arch} does not import here ({type(e).__name__}: {str(e)[:100]}); "
                       "tools/install_vllm.sh --torchvision gives it torchvision")
    return True, f"vLLM imports and runs {arch}"


def aux_layers(settings: Extraction) -> int | None:
    """How deep the transformers pass must go for the attention and hidden payloads (None: all)."""
    if "final" in settings.hidden_points or settings.text_pool:
        return None
    need = [li + 1 for li in settings.attn_layers]
    need += [int(m.group(1)) + 1 for p in settings.hidden_points if (m := re.fullmatch(r"layer:(\d+)", p))]
    return max(need, default=1)


class VLLMTeacher:
    name = "vllm"

    def __init__(self, model_dir, settings: Extraction, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float | None = None):
        self.settings = settings
        self.hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
        config = AutoConfig.from_pretrained(str(model_dir))
        # a processor family's ids come from the checkpoint's processor, as the transformers backend's do
        self.tok, self.layout = config_data_tokenizer(config, self.hf_tok, saved_processor(str(model_dir)))
        self.vocab_size = config.text_config.vocab_size
        self.llm = start_engine(model_dir, self.layout, settings.topk, tensor_parallel_size, data_parallel_size,
                                gpu_memory_utilization)
        self.aux = None
        if settings.attn_layers or settings.hidden_points or settings.gram or settings.text_pool:
            self.aux = HFTeacher(model_dir, settings, num_layers=aux_layers(settings), with_topk=False)
        self.model = self.aux.model if self.aux else None
        self.payload_backends = {"tokens": "vllm", "topk": "vllm", "attn": "hf", "hidden": "hf", "pooled": "hf"}

    def lm_head_gram(self) -> np.ndarray:
        return self.aux.lm_head_gram()

    def close(self) -> None:
        """Stop the engine now (its worker processes), not at interpreter exit."""
        stop_engine(self.llm)
        del self.llm

    def topk_arrays(self, items: list[Item]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(pos, ids, log-probs, tail) per item from one vLLM generate call, unquantised."""
        from vllm import SamplingParams

        s = self.settings
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=s.topk, detokenize=False)
        outs = self.llm.generate([engine_prompt(it, self.layout) for it in items], params, use_tqdm=False)
        result = []
        for it, o in zip(items, outs, strict=True):
            enc = it.enc
            check_prompt(it, o.prompt_token_ids)
            pos = scored_positions(enc, s.score_visual, s.score_text)
            k = min(s.topk, self.vocab_size)
            ids = np.zeros((len(pos), k), dtype=np.int64)
            lps = np.zeros((len(pos), k), dtype=np.float64)
            for r, p in enumerate(pos):
                row = o.prompt_logprobs[p + 1]  # vLLM's entry t is p(x_t | x_<t): our row p predicts p + 1
                top = sorted(((lp.rank, tid, lp.logprob) for tid, lp in row.items() if lp.rank <= k))[:k]
                ids[r] = [t for _, t, _ in top]
                lps[r] = [v for _, _, v in top]
            tail = np.array([_log1mexp(_logsumexp(row)) for row in lps], dtype=np.float64)
            result.append((pos, ids, lps, tail))
        return result

    def extract(self, items: list[Item]) -> list[dict[str, bytes]]:
        s = self.settings
        scored = self.topk_arrays(items)
        aux = self.aux.extract(items) if self.aux and (s.attn_layers or s.hidden_points) else [{}] * len(items)
        result = []
        for it, (pos, ids, lps, tail), extra in zip(items, scored, aux, strict=True):
            enc = it.enc
            members = {"tokens": fmt.encode_tokens(enc.input_ids, enc.labels_mask, enc.image_mask),
                       "topk": fmt.encode_topk(pos, *keep_top_p(ids, lps, tail, s.top_p, s.topk_min),
                                               self.vocab_size, s.code_bits)}
            result.append({**sample_head(it, pos, self.tok if s.keep_text else None), **members, **extra})
        return result


def start_engine(model_dir, layout, max_logprobs: int, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, seed: int = 0):
    """A vLLM engine for one model folder, as both the teacher backend and `vlmkd generate` run it."""
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # vLLM's CPU backend keeps one core for its front end by default; here the front end only
        # waits on the engine, so give the engine every core (override by setting the variable)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    kwargs = dict(model=str(model_dir), dtype="auto" if on_gpu else "float32",
                  max_logprobs=max_logprobs, max_model_len=layout.max_length,
                  limit_mm_per_prompt={"image": 1 if layout.visual is None else MAX_IMAGES},
                  tensor_parallel_size=tensor_parallel_size,
                  # the CPU backend's default memory fraction exceeds one NUMA node here
                  gpu_memory_utilization=gpu_memory_utilization or (0.85 if on_gpu else 0.3),
                  seed=seed)
    if data_parallel_size > 1:
        kwargs["data_parallel_size"] = data_parallel_size
    return LLM(**kwargs)


def stop_engine(llm) -> None:
    """Stop an engine's worker processes now, not at interpreter exit."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown:
        shutdown()


def engine_prompt(it: Item, layout):
    """A sample as vLLM takes it: the data path's token ids with each image's tokens collapsed to the one
    placeholder the chat template writes (vLLM's processor expands it again: `check_prompt` holds it to the
    same ids), and the decoded images. Fixed-block families: the block collapses to one `<image>`; processor
    families: the chat template's own ids (`Encoded.template_ids`)."""
    from vllm.inputs import TokensPrompt

    ids = it.enc.input_ids.tolist()
    images = [load_image(p, it.sample.id) for p in it.sample.images]
    if not images:
        return TokensPrompt(prompt_token_ids=ids)
    if layout.visual is not None:
        if len(images) > MAX_IMAGES:
            raise CacheError(f"sample {it.sample.id}: {len(images)} images; the vLLM backend takes up to {MAX_IMAGES} "
                             "per sample (use --backend hf for it)")
        if len(images) > 1 and layout.arch in ONE_IMAGE:
            raise CacheError(f"sample {it.sample.id}: {len(images)} images; {ONE_IMAGE[layout.arch]}, so the vLLM "
                             "backend takes one image per sample of this family (use --backend hf for such data)")
        # the ids as the chat template wrote them, one placeholder per image, which vLLM's copy of the
        # processor expands as the data path's did (Qwen's `<|image_pad|>`, InternVL's `<IMG_CONTEXT>`,
        # LLaVA-NeXT's `<image>`, Mistral's `[IMG]`, ...)
        return TokensPrompt(prompt_token_ids=it.enc.template_ids.tolist(), multi_modal_data={"image": images})
    block = layout.image_block
    start = int(np.argmax(it.enc.image_mask)) - block.index(layout.image_token_id)
    ids = ids[:start] + [layout.image_token_id] + ids[start + len(block):]
    return TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": images[0]})


def check_prompt(it: Item, engine_ids) -> None:
    """vLLM's expanded prompt must be the data path's ids token for token, or the job stops naming the sample."""
    if list(engine_ids) != it.enc.input_ids.tolist():
        raise CacheError(f"sample {it.sample.id}: vLLM read other token ids than vlmkd's data path "
                         f"({len(engine_ids)} vs {len(it.enc.input_ids)} tokens); the image block or "
                         "chat template differs between vLLM's processor and vlmkd")


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


def _log1mexp(x: float) -> float:
    """log(1 - e^x) for x <= 0; -inf when the top-k holds all the mass."""
    if x >= 0:
        return float("-inf")
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))

