"""A student with another tokenizer than the teacher's: re-tokenise each cached sample with the
student's own tokenizer and chat template, align the two tokenisations of each answer by text, and
lay the teacher's rows on the aligned spans (the `uld` term reads them).

Alignment (`align_spans`): the response tokens of one assistant turn on each side, by their
character spans in the turn's stripped answer text (the cache's `text` payload and the student's
`Tokenizer.response_spans`). A common boundary is a character offset where a token ends on both
sides; the spans between consecutive common boundaries are the shortest text spans both tokenisations
cover exactly. The leading space of the body counts as offset 0, and every token past the answer
(the end-of-turn marker, which differs between chat templates) ends at one virtual boundary, so
`<end_of_utterance>` and `<|im_end|>` align with each other. Tokens that share an end offset (the
pieces of one character split over several byte tokens) close no span until the last of them.

At a span's first token both models have read the same text (the prompt, then the answer up to the
span), so their next-token distributions there are comparable: that row pair is what `uld` compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmkd.data.manifest import Sample, Turn
from vlmkd.data.template import Tokenizer
from vlmkd.errors import CacheError, DataError


def _ends(spans: np.ndarray, answer_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's end offset mapped to a boundary value (clipped into [0, L], L + 1 past the answer,
    monotone), and whether it closes a span on its side: not when the next token starts before it ends
    (the bytes of one character split over two tokens carry overlapping character spans)."""
    sp = np.asarray(spans, np.int64).reshape(-1, 2)
    end = sp[:, 1]
    mapped = np.where(end > answer_len, answer_len + 1, np.clip(end, 0, answer_len))
    mapped = np.maximum.accumulate(mapped) if len(mapped) else mapped
    closes = np.r_[sp[1:, 0] >= end[:-1], True] if len(end) else np.zeros(0, bool)
    return mapped, closes


def align_spans(teacher: np.ndarray, student: np.ndarray, answer_len: int) -> list[tuple[list[int], list[int]]]:
    """Groups (teacher token indices, student token indices) of one turn's response tokens, in order;
    teacher / student: [n, 2] (start, end) character spans in the turn's stripped answer (length
    answer_len). Every token is in exactly one group and every group has tokens on both sides (none
    when a side has no tokens for the turn)."""
    (te, tc), (se, sc) = _ends(teacher, answer_len), _ends(student, answer_len)
    if not len(te) or not len(se):
        return []
    final = max(te[-1], se[-1])  # both sequences end the turn: their last tokens close the last span
    te[-1] = se[-1] = final
    common = np.array(sorted(set(te[tc].tolist()) & set(se[sc].tolist())))
    gt, gs = np.searchsorted(common, te), np.searchsorted(common, se)
    return [(np.flatnonzero(gt == g).tolist(), np.flatnonzero(gs == g).tolist()) for g in range(len(common))]


def align_sample(t_spans: np.ndarray, s_spans: np.ndarray, turns: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Groups over a whole sample: t_spans / s_spans [n, 3] (turn, start, end) in response-token order;
    the returned indices index those rows. Spans never cross turns."""
    groups = []
    for turn in np.unique(np.r_[t_spans[:, 0], s_spans[:, 0]]):
        ti, si = np.flatnonzero(t_spans[:, 0] == turn), np.flatnonzero(s_spans[:, 0] == turn)
        n = len(turns[int(turn)][1].strip())
        for gt, gs in align_spans(t_spans[ti, 1:], s_spans[si, 1:], n):
            groups.append((ti[gt].tolist(), si[gs].tolist()))
    return groups


def token_strings(hf_tok) -> list[str | None]:
    """Each id's text (None where it decodes to no whole characters: a byte of a split character)."""
    texts = hf_tok.batch_decode([[i] for i in range(len(hf_tok))], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    return [None if (not s or "\ufffd" in s) else s for s in texts]


def vocab_map(teacher_tok, student_tok) -> np.ndarray:
    """int64 [V_teacher]: the student id with the same string as each teacher id, -1 where none; one to
    one (a student id claimed by several teacher ids, e.g. a special token and a plain one of the same
    text, goes to the first), so that no student probability is counted twice in a row."""
    s_ids: dict[str, int] = {}
    for i, s in enumerate(token_strings(student_tok)):
        if s is not None:
            s_ids.setdefault(s, i)
    out = np.full(len(teacher_tok), -1, dtype=np.int64)
    taken: set[int] = set()
    for i, s in enumerate(token_strings(teacher_tok)):
        j = s_ids.get(s, -1) if s is not None else -1
        if j >= 0 and j not in taken:
            out[i] = j
            taken.add(j)
    return out


class Retokenizer:
    """Rewrites a cached sample for a student with its own tokenizer: the student's ids, response and
    visual flags, and per aligned span the teacher's row at its first token (x_lp, x_tail), the
    student position whose output meets it (x_pos), and, for the hybrid, whether the span is one shared
    token (x_exact) with the teacher's ids mapped into the student vocabulary (x_mids, x_mlp, x_mtail)."""

    def __init__(self, student: Tokenizer, mapping: np.ndarray):
        self.tok, self.map = student, mapping

    def __call__(self, s: dict) -> dict:
        if "text_turns" not in s:
            raise CacheError(f"sample {s['id']}: no text payload (a cache built without --keep-text)")
        turns = s["text_turns"]
        has_image = bool(s["visual"].any())
        sample = Sample(s["id"], (Path("cache-image"),) if has_image else (), tuple(Turn(r, t) for r, t in turns))
        try:
            enc = self.tok.encode(sample)
        except DataError as e:
            raise CacheError(f"the student's tokenizer cannot take cached sample {s['id']}: {e}") from e
        out = {k: v for k, v in s.items() if k not in ("ids", "logprobs", "tail", "pos", "text_turns", "text_spans")}
        out.update(input_ids=enc.input_ids, response=enc.labels_mask, visual=enc.image_mask)
        if "ids" not in s:  # no logit payload read (a recipe without uld): the student's own tokens only
            return out
        s_spans = self.tok.response_spans(sample)
        t_spans = s["text_spans"]
        t_resp = np.flatnonzero(s["response"])
        if len(t_spans) != len(t_resp):
            raise CacheError(f"sample {s['id']}: {len(t_spans)} text spans for {len(t_resp)} response tokens in the "
                             "cache: a corrupt text payload")
        s_resp = np.flatnonzero(enc.labels_mask)
        groups = align_sample(t_spans, s_spans, turns)
        first_t = np.array([g[0][0] for g in groups], dtype=np.int64)
        first_s = np.array([g[1][0] for g in groups], dtype=np.int64)
        rows = np.searchsorted(s["pos"], t_resp[first_t] - 1)  # the teacher row predicting each span's first token
        ids, lp, tail = s["ids"][rows], s["logprobs"][rows], s["tail"][rows]
        single = np.array([len(g[0]) == 1 and len(g[1]) == 1 for g in groups], dtype=bool)
        t_tok = s["input_ids"][t_resp[first_t]].astype(np.int64)
        exact = single & (self.map[t_tok] == enc.input_ids[s_resp[first_s]])
        mids = self.map[ids]
        keep = (mids >= 0) & np.isfinite(lp)
        with np.errstate(divide="ignore"):
            lost = np.log(np.where(np.isfinite(lp) & ~keep, np.exp(lp.astype(np.float64)), 0.0).sum(-1))
        out.update(x_pos=s_resp[first_s] - 1, x_lp=lp, x_tail=tail, x_exact=exact,
                   x_mids=np.where(keep, mids, 0), x_mlp=np.where(keep, lp, -np.inf),
                   x_mtail=np.logaddexp(tail.astype(np.float64), lost))
        return out
