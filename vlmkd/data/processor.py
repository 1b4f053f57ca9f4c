"""Tokenisation and pixels through the checkpoint's own processor and chat template.

For a model family whose visual tokens the processor decides (Qwen2-VL's dynamic resolution: one token
per 2 x 2 patches of the resized image, so any count per image), the ids, label mask and pixels are
what `processor.apply_chat_template` + `processor(text, images)` give, byte for byte: the teacher is
scored, cached and the student trained on the prompt format the checkpoint was trained on.

The label mask is exact without offset arithmetic: for each assistant turn the conversation before it
(with the generation prompt) and through it are rendered and processed; the template must be prefix-
stable (the longer conversation starts with the shorter one's ids: every chat template vlmkd knows
is), which is checked, so a template that renders an earlier turn differently later is refused rather
than mislabelled. The response tokens are the assistant turn's tokens after the generation prompt up
to and including its end-of-turn marker; whitespace after the marker (Qwen's newline) is not learnt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmkd.data.images import load_image
from vlmkd.data.manifest import IMAGE_PLACEHOLDER, Sample
from vlmkd.data.template import Encoded
from vlmkd.errors import DataError


@dataclass(frozen=True)
class VisualInputs:
    """A family's image inputs: the processor's per-image tensors (e.g. Qwen's flattened patches and
    `image_grid_thw`), how many visual tokens they make, and how rows of them batch (concatenated in
    row order, as the model reads them)."""

    processor: object
    count: Callable[[dict], int]  # visual tokens the model places for one sample's inputs
    keys: tuple[str, ...]  # the forward's image inputs, in the batch under these names

    def encode(self, images: Sequence) -> dict[str, torch.Tensor]:
        """The image inputs of `processor(text, images)` from the images alone (a student's pixels from
        the cache's image files): the image processor called with the options the processor itself
        passes it (its defaults merged with the checkpoint's: InternVL's `crop_to_patches`, ...), through
        the processor's own image step where it has one (Pixtral's rounds sizes to merged patches)."""
        from transformers import ProcessorMixin

        proc = self.processor
        kwargs = proc._merge_kwargs(proc.valid_processor_kwargs, tokenizer_init_kwargs=proc.tokenizer.init_kwargs)
        kwargs = {**kwargs["images_kwargs"], "return_tensors": "pt"}
        # one sample's images as one nested list, as `apply_chat_template` batches them (LLaVA-OneVision
        # tells a several-image sample from single images by the nesting)
        images = [list(images)]
        if type(proc)._process_images is not ProcessorMixin._process_images:
            out = proc._process_images(images, **kwargs)[0]
        else:
            out = proc.image_processor(images=images, **kwargs)
        return {k: out[k] for k in self.keys}

    def batch(self, rows: Sequence[dict | None]) -> dict[str, torch.Tensor] | None:
        """The rows' inputs concatenated; a tensor the processor pads per call (LLaVA-NeXT's
        [images, tiles, 3, H, W], tiles up to the call's most) is zero-padded to the batch's largest,
        which the model slices off again by each image's own size."""
        real = [r for r in rows if r is not None]
        if not real:
            return None
        return {k: torch.cat(_padded([r[k] for r in real])) for k in self.keys}


def _padded(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            big = p.new_zeros((p.shape[0], *shape))
            big[(slice(None), *(slice(0, n) for n in p.shape[1:]))] = p
            p = big
        out.append(p)
    return out


def messages_of(turns) -> list[dict]:
    """vlmkd's turns as chat-template messages: `<image>` placeholders become image parts where they
    stand, the text around them stripped text parts (the structure every family's template reads, as
    transformers' own examples write it: `[{"type": "image"}, {"type": "text", "text": "Describe it."}]`)."""
    out = []
    for t in turns:
        parts = []
        for j, piece in enumerate(t.text.split(IMAGE_PLACEHOLDER)):
            if j:
                parts.append({"type": "image"})
            if piece.strip() or (t.role == "assistant" and j == 0):
                parts.append({"type": "text", "text": piece.strip()})
        out.append({"role": t.role, "content": parts})
    return out


class ProcessorEncoder:
    """The data path's tokenizer for processor families: same interface as `template.Tokenizer`
    (`encode`, `pad_id`, `hf`, `decode`), and it also reads the sample's images (`reads_images`)."""

    reads_images = True

    def __init__(self, processor, visual: VisualInputs, image_token_id: int, max_length: int):
        self.processor = processor
        self.hf = processor.tokenizer
        self.visual = visual
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else 0
        self.eou_id = self.hf.eos_token_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _process(self, text: str, images: list, tensors: str):
        """`processor(text, images)` as `processor.apply_chat_template(..., tokenize=True)` calls it: the
        images nested per conversation, and a template that writes the BOS itself (Gemma's, Llama's) gets
        no second one from the tokenizer."""
        extra = {} if self._adds_bos(text) else {"add_special_tokens": False}
        return self.processor(text=[text], images=[list(images)] if images else None, return_tensors=tensors, **extra)

    def _adds_bos(self, text: str) -> bool:
        """Whether tokenising `text` adds the special tokens: not when the template wrote the BOS itself."""
        bos = self.hf.bos_token
        return not (bos and text.startswith(bos))

    def _ids(self, text: str, images: list) -> list[int]:
        return self._process(text, images, "np")["input_ids"][0].tolist()

    def encode_item(self, sample: Sample, with_answer: bool = True) -> tuple[Encoded, dict | None]:
        """(Encoded, the processor's image inputs or None): ids, label mask and pixels from one
        `processor(...)` call over the whole conversation, the mask from its prefixes."""
        turns = list(sample.turns)
        if not with_answer:
            turns = turns[: max(i for i, t in enumerate(turns) if t.role == "user") + 1]
        images = [load_image(p, sample.id) for p in sample.images]
        placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
        if placeholders != len(images):
            raise DataError(f"sample {sample.id}: {len(images)} images and {placeholders} {IMAGE_PLACEHOLDER} "
                            "placeholders in its turns; give each image one placeholder")
        out, labels, template_ids = self._tokens(sample, turns, images, with_answer)
        ids = out["input_ids"][0].numpy().astype(np.int64)
        if len(ids) > self.max_length:
            raise DataError(f"sample {sample.id}: {len(ids)} tokens, longer than the model's {self.max_length}; "
                            "shorten it, make its images smaller (the processor's max_pixels) or raise the model's "
                            "max_position_embeddings")
        visual = {k: out[k] for k in self.visual.keys} if images else None
        image_mask = ids == self.image_token_id
        expected = self.visual.count(visual) if visual is not None else 0
        if visual is not None and expected == 0:
            raise DataError(f"sample {sample.id}: its images make no visual tokens under the processor (too small or "
                            "too thin for one merged patch); enlarge or drop them")
        if int(image_mask.sum()) != expected:
            raise DataError(f"sample {sample.id}: {int(image_mask.sum())} image tokens after processing, the images "
                            f"make {expected} (does the text contain a literal image token?)")
        prompt_len = int(np.argmax(labels)) if labels.any() else len(ids)
        return Encoded(sample.id, ids, labels, image_mask, prompt_len, template_ids), visual

    def _tokens(self, sample: Sample, turns, images: list, with_answer: bool) -> tuple[dict, np.ndarray, np.ndarray]:
        """(the processor's outputs for the conversation, its label mask, the ids of the rendered text
        before the processor's expansion): the chat template rendered, each assistant turn's tokens found
        by its prefixes (`_span`)."""
        messages = messages_of(turns)
        text = self._render(messages, generation_prompt=not with_answer)
        out = self._process(text, images, "pt")
        # (tokenised as `_process` has the processor do it)
        template_ids = np.asarray(self.hf(text, add_special_tokens=self._adds_bos(text))["input_ids"], dtype=np.int64)
        ids = out["input_ids"][0].numpy().astype(np.int64)
        labels = np.zeros(len(ids), dtype=bool)
        if with_answer:
            for i, t in enumerate(turns):
                if t.role == "assistant":
                    start, end = self._span(messages, i, turns, images, ids, sample.id)
                    labels[start:end] = True
        return out, labels, template_ids

    def _span(self, messages, i: int, turns, images, ids: np.ndarray, sample_id: str) -> tuple[int, int]:
        """[start, end) of assistant turn i's response tokens in `ids`."""
        n_img = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns[:i])
        before = self._ids(self._render(messages[:i], True), images[:n_img])
        through = self._ids(self._render(messages[: i + 1], False), images[:n_img])
        for part in (before, through):
            if len(part) > len(ids) or ids[: len(part)].tolist() != part:
                raise DataError(f"sample {sample_id}: the chat template renders turn {i} differently inside the "
                                "longer conversation, so its assistant tokens cannot be masked exactly; use a "
                                "prefix-stable chat template")
        end = len(through)
        while end > len(before) and not self.hf.decode([int(ids[end - 1])]).strip():
            end -= 1  # whitespace after the end-of-turn marker is the template's, not the answer's
        return len(before), end

    def encode(self, sample: Sample, with_answer: bool = True) -> Encoded:
        return self.encode_item(sample, with_answer)[0]

    def response_spans(self, sample: Sample):
        raise DataError("keep_text (a cross-tokenizer student's alignment) is not built for processor-templated "
                        "families yet; use a student with the teacher's tokenizer")

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


class PrefixEncoder(ProcessorEncoder):
    """A prefix-LM's data path (PaliGemma: no chat template): the sample is one prompt and one answer,
    given to the processor as it documents, `processor(text=prompt, images=..., suffix=answer)`, which
    writes the images, BOS, prompt and a newline (the prefix, attended both ways) and then the answer
    and EOS (the suffix: the tokens learnt, `labels` != -100). A sample of several exchanges, a system
    turn or no image is refused saying so: the format has no place for them."""

    def _tokens(self, sample: Sample, turns, images: list, with_answer: bool) -> tuple[dict, np.ndarray, None]:
        roles = [t.role for t in turns]
        if roles not in (["user", "assistant"], ["user"]) or not images:
            raise DataError(f"sample {sample.id}: a prefix-LM without a chat template (PaliGemma) takes one user "
                            f"turn with its image(s) and one answer; this sample has turns {roles} and "
                            f"{len(images)} images; split it into single exchanges or use a chat family")
        prompt = " ".join(p.strip() for p in turns[0].text.split(IMAGE_PLACEHOLDER) if p.strip())
        prompt = self.processor.image_token * len(images) + prompt  # the images first, as the processor asks
        extra = {"suffix": [turns[1].text.strip()]} if with_answer else {}
        out = self.processor(text=[prompt], images=[list(images)], return_tensors="pt", **extra)
        labels = (out["labels"][0] != -100).numpy() if with_answer else np.zeros(out["input_ids"].shape[1], dtype=bool)
        return out, labels, None
