"""The chat template and tokenisation with a label mask.

The conversation is rendered as segments and each segment is tokenised alone, so the assistant tokens
(the only ones the loss sees) are known exactly, with no offset arithmetic. The `<image>` placeholder
becomes the model's image block (for Idefics3: `<fake_token_around_image><global-img>` + N x `<image>`
+ `<fake_token_around_image>`, as its HF processor writes it; for LLaVA: N x `<image>`). The token ids
made here are the ones the teacher scores and the student trains on: nothing re-tokenises later.

Rendered form (SmolVLM style), image_position "start" / "end"::

    <|im_start|>User:<image block>\nWhat color is the circle?<end_of_utterance>\nAssistant: red<end_of_utterance>\n
    <|im_start|>User:What color is the circle?\n<image block><end_of_utterance>\nAssistant: red<end_of_utterance>\n

With "end", the visual tokens come after the question, so causal attention lets each of them read the
question: they come out question-aware, and binding a position or a colour to a visual token becomes
learnable for a small model trained from scratch (measured: docs/TEACHER.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmkd.data.manifest import IMAGE_PLACEHOLDER, Sample
from vlmkd.errors import DataError

BOS = "<|im_start|>"
EOU = "<end_of_utterance>"
ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


def chat_template(image_position: str = "start") -> str:
    """Jinja form of the same template, saved with the tokenizer so other tools render it the same way
    (the processor expands `<image>` to the model's image block)."""
    text = "{% for line in message['content'] %}{% if line['type'] == 'text' %}" \
           "{% if message['role'] == 'assistant' %} {% endif %}{{ line['text'] }}{% endif %}{% endfor %}"
    image = "{% for line in message['content'] %}{% if line['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    if image_position == "end":
        body = text + image.replace("<image>", "{{ '\\n' }}<image>")  # Jinja's trim_blocks eats a bare newline
    else:
        body = image.replace("<image>", "<image>\n") + text
    return (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
        "{% if message['content'] is string %}{% if message['role'] == 'assistant' %} {% endif %}"
        "{{ message['content'] }}{% else %}" + body + "{% endif %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )



def assistant_body(text: str) -> tuple[str, int]:
    """An assistant turn's tokenised body (the response tokens) and where the stripped answer text
    starts in it: the answer's character coordinates are what two tokenisations are aligned in."""
    return f" {text.strip()}{EOU}", 1


@dataclass(frozen=True)
class Encoded:
    """One tokenised sample. Arrays are [T]."""

    sample_id: str
    input_ids: np.ndarray  # int64
    labels_mask: np.ndarray  # bool: True on assistant tokens (the response positions R)
    image_mask: np.ndarray  # bool: True on the N visual tokens (the visual positions V)
    prompt_len: int  # tokens before the first response token (where generation starts)
    # a processor family's ids before its processor expanded each image's placeholder (what the chat
    # template wrote: the prompt an engine with its own copy of the processor takes, vLLM's)
    template_ids: np.ndarray | None = None


class Tokenizer:
    """Wraps a HF tokenizer with the image block of one model layout."""

    def __init__(self, hf_tokenizer, image_block: list[int], image_token_id: int, max_length: int):
        self.hf = hf_tokenizer
        # "start": the image block where the manifest puts <image> (LLaVA's convention, usually first);
        # "end": after the turn's text, so that the visual tokens can attend to the question (causal
        # attention) and come out question-aware. A model's choice, saved with its tokenizer.
        self.image_position = hf_tokenizer.init_kwargs.get("image_position", "start")
        self.image_block = list(image_block)
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.eou_id = hf_tokenizer.convert_tokens_to_ids(EOU)
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0

    def _ids(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"] if text else []

    def _user_ids(self, text: str) -> list[int]:
        """A user turn's text, with its `<image>` placeholder replaced by the image block."""
        if IMAGE_PLACEHOLDER not in text:
            return self._ids(text)
        before, after = text.split(IMAGE_PLACEHOLDER, 1)
        if self.image_position == "end":
            return self._ids((before + after).strip() + "\n") + self.image_block
        return self._ids(before) + self.image_block + self._ids(after)

    def encode(self, sample: Sample, with_answer: bool = True) -> Encoded:
        """Token ids, label mask and image mask; `with_answer=False` stops at the generation prompt."""
        ids: list[int] = self._ids(BOS)
        labels: list[bool] = [False] * len(ids)
        turns = list(sample.turns)
        if not with_answer:
            last_user = max(i for i, t in enumerate(turns) if t.role == "user")
            turns = turns[: last_user + 1]
        for turn in turns:
            head = self._ids(f"{ROLE_NAMES[turn.role]}:")
            ids += head
            labels += [False] * len(head)
            if turn.role == "assistant":
                body = self._ids(assistant_body(turn.text)[0])
                ids += body
                labels += [True] * len(body)
                tail = self._ids("\n")
            else:
                tail = self._user_ids(turn.text) + self._ids(f"{EOU}\n")
            ids += tail
            labels += [False] * len(tail)
        prompt_len = labels.index(True) if True in labels else len(ids)
        if not with_answer:
            ids += self._ids("Assistant:")
            labels = [False] * len(ids)  # a generation prompt has nothing to learn
            prompt_len = len(ids)
        arr = np.asarray(ids, dtype=np.int64)
        if len(arr) > self.max_length:
            raise DataError(
                f"sample {sample.id}: {len(arr)} tokens, longer than the model's {self.max_length}; "
                "shorten it or raise the model's max_position_embeddings"
            )
        image_mask = arr == self.image_token_id
        n_img = int(image_mask.sum())
        expected = self.image_block.count(self.image_token_id) if sample.image is not None else 0
        if n_img != expected:
            raise DataError(
                f"sample {sample.id}: {n_img} image tokens after tokenisation, expected {expected} "
                f"(does the text contain a literal image token?)"
            )
        return Encoded(sample.id, arr, np.asarray(labels, dtype=bool), image_mask, prompt_len)

    def response_spans(self, sample: Sample) -> np.ndarray:
        """int32 [n, 3]: (turn index, start, end) of each response token, in that order, as character
        offsets into the turn's stripped answer text (< 0 on the body's leading space, > its length on
        the end-of-turn marker): what a student with another tokenizer aligns to (`vlmkd.train.cross`)."""
        rows = []
        for i, turn in enumerate(sample.turns):
            if turn.role != "assistant":
                continue
            body, start = assistant_body(turn.text)
            enc = self.hf(body, add_special_tokens=False, return_offsets_mapping=True)
            rows += [(i, a - start, b - start) for a, b in enc["offset_mapping"]]
        return np.asarray(rows, dtype=np.int32).reshape(-1, 3)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)
