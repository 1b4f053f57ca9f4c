"""The transformers teacher backend: one teacher-forced forward per batch yields every payload.

Top-k log-probs at temperature 1 (the student applies its own temperature), the tail log-mass over
the complement (logsumexp of the rest, exact, -inf when k = V), the chosen shallow layers' text-to-
vision attention, and visual-token hidden states, optionally through a fixed seeded projection.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from transformers import AutoConfig

from vlmkd.cache import format as fmt
from vlmkd.cache.shards import LAYOUTS
from vlmkd.data.dataset import Item, collate, encode_samples, model_inputs
from vlmkd.data.manifest import Turn
from vlmkd.errors import RecipeError
from vlmkd.models.build import data_tokenizer, load_model
from vlmkd.models.probe import probe, visual_states

# settings newer than the first caches: recorded only away from their defaults (the value every
# older cache was made with), so those caches keep their fingerprint
LATER_SETTINGS = ("top_p", "topk_min", "shard_layout", "keep_text", "score_text")


@dataclass
class Extraction:
    """What the cache job extracts; recorded in the manifest. Defaults follow the seed papers:
    k = 64 top-k; Align-KD distils the first layer's attention; LLaVA-KD's RDist needs the final
    visual hidden states and the LM head's Gram matrix."""

    topk: int = 64
    # adaptive k (`logits: topk`): per scored row keep the fewest of the top `topk` ids whose mass
    # reaches `top_p` (at least `topk_min`); the tail bucket holds the rest, exactly. None: fixed k
    top_p: float | None = None
    topk_min: int = 1
    # "topk": the k most likely ids + the exact tail; "sampled": Random-Sampling KD (Anshumann et al.,
    # 2025): `draws` ids drawn per row from the teacher at `proposal_temperature`, stored as unique ids
    # with counts (and, when t != 1, the teacher's log-probs of them, for exact importance weights)
    logits: str = "topk"
    draws: int = 50
    proposal_temperature: float = 1.0
    sample_seed: int = 0
    code_bits: int = 8  # top-k log-prob quantisation (docs/FORMAT.md)
    score_visual: bool = False  # LLaVA-KD L_vis: also score the visual-token positions
    # also score every prompt text position (the `txt` term: logit KD at every text position, as the
    # Align-KD authors distil the logits; the shipped caches score the response only)
    score_text: bool = False
    attn_layers: list[int] = field(default_factory=lambda: [0])
    attn_heads: str = "mean"  # "mean" over heads, or "all"
    hidden_points: list[str] = field(default_factory=lambda: ["projector", "final"])
    hidden_dim: int | None = None  # reduce hidden states to r dims by a fixed seeded projection
    hidden_seed: int = 0
    text_pool: bool = False  # the mean final hidden state over the prompt's text tokens (contrastive term)
    gram: bool = True
    batch_size: int = 32
    shard_layout: str = "tar"  # "tar" (WebDataset) or "parquet" (one row per sample): docs/FORMAT.md
    # the conversation and each response token's character span (the `text` payload): a student with
    # another tokenizer re-tokenises the sample and aligns its tokens to the teacher's rows
    keep_text: bool = False

    def __post_init__(self):
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise RecipeError(f"top_p {self.top_p}: a probability mass in (0, 1]")
        if not 1 <= self.topk_min <= self.topk:
            raise RecipeError(f"topk_min {self.topk_min}: between 1 and topk ({self.topk})")
        if self.shard_layout not in LAYOUTS:
            raise RecipeError(f"shard_layout {self.shard_layout!r}: choose one of {sorted(LAYOUTS)}")

    def to_dict(self) -> dict:
        """As the manifest records it: settings added after caches were first written are left out at
        their defaults, so those caches keep their fingerprint (a re-run still finds them complete)."""
        d = asdict(self)
        for f in fields(self):
            if f.name in LATER_SETTINGS and d[f.name] == f.default:
                del d[f.name]
        return d


def projection(dim: int, r: int, seed: int) -> torch.Tensor:
    """The fixed random projection [D, r] (Gaussian / sqrt(r)); regenerate it from (D, r, seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, r, generator=g, dtype=torch.float32) / r**0.5


def sampled_rows(logits: torch.Tensor, draws: int, temperature: float, seed: int):
    """logits [R, V] -> per row the unique ids drawn (`draws` times, with replacement) from
    softmax(logits / temperature), their counts and teacher log-probs at temperature 1, and
    logz [R] = log sum_v p_v^(1/temperature) (the proposal's normaliser, for exact importance weights)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    prop = torch.log_softmax(lp / temperature, dim=-1)
    logz = torch.logsumexp(lp / temperature, dim=-1)
    g = torch.Generator().manual_seed(seed)
    draws_idx = torch.multinomial(prop.exp(), draws, replacement=True, generator=g)
    ids, counts, lps = [], [], []
    for r in range(len(lp)):
        u, c = torch.unique(draws_idx[r], return_counts=True)
        ids.append(u.numpy())
        counts.append(c.numpy())
        lps.append(lp[r, u].numpy())
    return ids, counts, lps, logz.numpy()


def sample_seed(sample_id: str, seed: int) -> int:
    """A sample's own sampling seed: the same draws however the job is batched, split or resumed."""
    return (zlib.crc32(sample_id.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def topk_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (ids [R, k], log-probs [R, k], tail log-mass [R]) at temperature 1."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    k = min(k, lp.shape[-1])
    vals, ids = lp.topk(k, dim=-1)
    rest = lp.scatter(-1, ids, float("-inf"))
    return ids, vals, torch.logsumexp(rest, dim=-1)


def keep_top_p(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, top_p: float | None,
               k_min: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adaptive k: in each row of top-k (ids, log-probs [R, k], log tail [R]) keep the fewest ids whose
    mass reaches `top_p` (at least `k_min`, at most k); the others become no-slots (log-prob -inf) and
    their mass joins the tail, in float64, so the tail stays exact. None: the rows as they are."""
    if top_p is None:
        return ids, logprobs, tail
    lp = np.asarray(logprobs, np.float64)
    order = np.argsort(-lp, axis=-1, kind="stable")
    p = np.exp(np.take_along_axis(lp, order, -1))
    reach = np.cumsum(p, -1) >= top_p * (1 - 1e-12)  # (a row's own rounding must not cost it an id)
    n = np.where(reach.any(-1), reach.argmax(-1) + 1, lp.shape[-1])
    n = np.clip(n, min(k_min, lp.shape[-1]), lp.shape[-1])
    drop_sorted = np.arange(lp.shape[-1])[None] >= n[:, None]
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, -1)
    with np.errstate(divide="ignore"):
        extra = np.log(np.where(drop, np.exp(lp), 0.0).sum(-1))
    new_tail = np.logaddexp(np.asarray(tail, np.float64), extra)
    return ids, np.where(drop, -np.inf, lp), new_tail


class HFTeacher:
    name = "hf"

    def __init__(self, model_dir, settings: Extraction, dtype: torch.dtype = torch.float32,
                 num_layers: int | None = None, with_topk: bool = True):
        """`num_layers` truncates the LLM (a shallow pass for attention maps and early hidden states
        when another backend scores the logits); `with_topk=False` leaves the logit payloads out."""
        self.model, self.hf_tok = load_model(model_dir, dtype, num_layers=num_layers)
        self.with_topk = with_topk
        self.model.eval()
        self.full_layers = AutoConfig.from_pretrained(str(model_dir)).text_config.num_hidden_layers
        self.tok, self.layout = data_tokenizer(self.model, self.hf_tok)
        self.settings = settings
        self.vocab_size = self.model.config.text_config.vocab_size
        self.proj = None
        if settings.hidden_dim:
            self.proj = projection(self.model.config.text_config.hidden_size, settings.hidden_dim, settings.hidden_seed)

    def _narrowed(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states as the cache stores them: through the fixed projection when `hidden_dim` is set."""
        return h @ self.proj if self.proj is not None else h

    def lm_head_gram(self) -> np.ndarray:
        """G = W^T W [D, D] of the LM head, so a student can form Y Y^T = H G H^T from hidden states."""
        w = self.model.lm_head.weight.detach().double()
        return (w.T @ w).numpy()

    @torch.no_grad()
    def extract(self, items: list[Item]) -> list[dict[str, bytes]]:
        """Payload members for each item (tokens, topk, attn, hidden), encoded by the cache codec."""
        s = self.settings
        batch = collate(items, self.layout, self.tok.pad_id)
        points = [p for p in s.hidden_points if self.covers(p)]
        if s.text_pool and self.covers("final") and "final" not in points:
            points.append("final")
        with probe(self.model, batch["attention_mask"], s.attn_layers, points) as pr:
            logits = self.model(**model_inputs(batch)).logits
        out = []
        vis_row = np.cumsum(batch["image_mask"].any(1).numpy()) - 1  # row b's place among rows with an image
        vis_states = ({point: visual_states(pr, point, batch["image_mask"]) for point in s.hidden_points}
                      if batch["image_mask"].any() else {})  # (a text-only batch runs no connector)
        for b, it in enumerate(items):
            enc = it.enc
            T = len(enc.input_ids)
            pos = scored_positions(enc, s.score_visual, s.score_text)
            members = {}
            if self.with_topk:
                rows = logits[b, torch.from_numpy(pos)]
                members["tokens"] = fmt.encode_tokens(enc.input_ids, enc.labels_mask, enc.image_mask)
                if s.logits == "sampled":
                    ids, counts, lps, logz = sampled_rows(rows, s.draws, s.proposal_temperature,
                                                          sample_seed(it.sample.id, s.sample_seed))
                    # the teacher's log-probs and the normaliser only where the weights need them (t != 1):
                    # they would otherwise cost more bytes than the ids and counts together
                    tempered = s.proposal_temperature != 1.0
                    members["sampled"] = fmt.encode_sampled(pos, ids, counts, s.draws, s.proposal_temperature,
                                                            lps if tempered else None, logz if tempered else None)
                else:
                    ids, lps, tail = keep_top_p(*(t.numpy() for t in topk_rows(rows, s.topk)), s.top_p, s.topk_min)
                    members["topk"] = fmt.encode_topk(pos, ids, lps, tail, self.vocab_size, s.code_bits)
            vis = np.flatnonzero(enc.image_mask)
            if s.attn_layers and len(vis):
                qpos = np.arange(vis[-1] + 1, T)
                maps = torch.stack([pr.attn[li][b] for li in s.attn_layers])  # [L, H, T, T]
                maps = maps[:, :, torch.from_numpy(qpos)][..., torch.from_numpy(vis)]
                if s.attn_heads == "mean":
                    maps = maps.mean(1, keepdim=True)
                members["attn"] = fmt.encode_attn(qpos, maps.numpy())
            if s.hidden_points and len(vis):
                hs = []
                for point in s.hidden_points:
                    hs.append(self._narrowed(vis_states[point][vis_row[b]].float()))
                members["hidden"] = fmt.encode_hidden(torch.stack(hs).numpy())
            if s.text_pool and self.covers("final"):
                text = torch.from_numpy(~enc.image_mask.astype(bool) & ~enc.labels_mask.astype(bool))
                v = pr.hidden["final"][b, :T][text].float().mean(0)
                members["pooled"] = fmt.encode_pooled(self._narrowed(v).numpy())
            out.append({**sample_head(it, pos, self.tok if s.keep_text else None), **members}
                       if self.with_topk else members)
        if self.with_topk:
            for b, pair in self._preference_pairs(items, logits).items():
                out[b]["pref"] = pair
        return out

    def _preference_pairs(self, items: list[Item], logits: torch.Tensor) -> dict[int, bytes]:
        """For samples with a `rejected` answer (LLaVA-MoD preference pairs): the teacher's per-token
        log-probs of the chosen response (from this batch's forward) and of the rejected one (a second
        teacher-forced forward of the same prompt with the wrong answer)."""
        idx = [b for b, it in enumerate(items) if "rejected" in it.sample.extra]
        if not idx:
            return {}
        rejected = []
        for b in idx:
            s = items[b].sample
            last = max(i for i, t in enumerate(s.turns) if t.role == "assistant")
            turns = tuple(Turn(t.role, str(s.extra["rejected"])) if i == last else t for i, t in enumerate(s.turns))
            rejected.append(replace(s, turns=turns))
        r_items = encode_samples(rejected, self.tok, self.layout, strict=True)
        r_logits = self.model(**model_inputs(collate(r_items, self.layout, self.tok.pad_id))).logits
        out = {}
        for j, b in enumerate(idx):
            c_lp = response_logprobs(logits[b], items[b].enc)
            r_lp = response_logprobs(r_logits[j], r_items[j].enc)
            enc = r_items[j].enc
            out[b] = fmt.encode_pref(enc.input_ids, enc.labels_mask, c_lp, r_lp)
        return out

    @torch.no_grad()
    def topk_arrays(self, items: list[Item]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(pos, ids, log-probs, tail) per item, unquantised (for parity checks and benchmarks)."""
        batch = collate(items, self.layout, self.tok.pad_id)
        logits = self.model(**model_inputs(batch)).logits
        out = []
        for b, it in enumerate(items):
            pos = scored_positions(it.enc, self.settings.score_visual, self.settings.score_text)
            ids, lps, tail = topk_rows(logits[b, torch.from_numpy(pos)], self.settings.topk)
            out.append((pos, ids.numpy(), lps.double().numpy(), tail.double().numpy()))
        return out

    def covers(self, point: str) -> bool:
        """Whether this (possibly truncated) model reaches a hidden point."""
        n = self.model.config.text_config.num_hidden_layers
        if point == "final":
            return n == self.full_layers
        return point == "projector" or int(point.split(":")[1]) < n


def response_logprobs(logits: torch.Tensor, enc) -> np.ndarray:
    """log p(x_t | x_<t) at every response token t of one sequence (float64 log-softmax)."""
    t = np.flatnonzero(enc.labels_mask)
    rows = torch.log_softmax(logits[torch.from_numpy(t - 1)].double(), -1)
    return rows.gather(-1, torch.from_numpy(enc.input_ids[t]).long()[:, None])[:, 0].numpy()


def scored_positions(enc, score_visual: bool, score_text: bool = False) -> np.ndarray:
    """The rows the cache stores: pos = t - 1 for response tokens t, pos = t for visual tokens t
    (`score_visual`), and with `score_text` every other position that predicts a next token (the prompt's
    text and template rows)."""
    pos = np.flatnonzero(enc.labels_mask) - 1
    if score_visual:
        pos = np.union1d(pos, np.flatnonzero(enc.image_mask))
    if score_text:
        text = np.flatnonzero(~np.asarray(enc.image_mask, dtype=bool)[:-1])
        pos = np.union1d(pos, text)
    return pos


def row_fields(sample) -> dict:
    """The manifest row's short scalar fields (kind, type, source, ...), kept in the sample's meta so a
    recipe stage can select its samples by one (`data_field`) from the cache alone."""
    return {k: v for k, v in sample.extra.items()
            if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200 and k != "rejected"}


def sample_head(it: Item, pos: np.ndarray, text_tok=None) -> dict[str, bytes]:
    """The meta (and image) members every backend writes for a sample; with `text_tok` (the teacher's
    data tokenizer, `keep_text`), the text member: its turns and the response tokens' character spans."""
    enc = it.enc
    meta = {"id": it.sample.id, "prompt": it.sample.question[:500], "tokens": int(len(enc.input_ids)),
            "response_tokens": int(enc.labels_mask.sum()), "scored": int(len(pos)),
            "visual_tokens": int(enc.image_mask.sum()), "fields": row_fields(it.sample)}
    files = [p.read_bytes() for p in it.sample.images]
    image = {"image": files[0]} if files else {}
    if len(files) > 1:  # several images per sample (format 2)
        meta["images"] = len(files)
        image["images"] = fmt.encode_images(files[1:])
    text = {}
    if text_tok is not None:
        spans = text_tok.response_spans(it.sample)
        if len(spans) != int(enc.labels_mask.sum()):
            raise RuntimeError(f"sample {it.sample.id}: {len(spans)} spans for {int(enc.labels_mask.sum())} response "
                               "tokens (the template's assistant body and its spans disagree)")
        text = {"text": fmt.encode_text([(t.role, t.text) for t in it.sample.turns], spans)}
    return {"meta": fmt.encode_meta(meta), **image, **text}
