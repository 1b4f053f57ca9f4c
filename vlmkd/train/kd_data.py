"""Teacher-cache samples -> student batches: the cache's exact token ids, the student's own pixels from
the image bytes in the shard, and the teacher's payloads laid out on the student's positions.

The student reads shards only (never the teacher, never the data manifest's images).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from itertools import count

import numpy as np
import torch
from PIL import Image

from vlmkd.cache.join import TeacherMix
from vlmkd.cache.reader import CacheReader
from vlmkd.data.dataset import image_inputs, with_token_types
from vlmkd.data.images import to_rgb, to_uint8
from vlmkd.data.layout import Layout
from vlmkd.data.select import accepts, lacks_field
from vlmkd.errors import CacheError, RecipeError
from vlmkd.progress import console
from vlmkd.train.dist import dist_info
from vlmkd.train.recipe import Stage


def student_pixels(files: list[bytes], layout: Layout, sample: str) -> np.ndarray | dict:
    """The student's pixels from a sample's image files in the shard (the reader's `image`, in order),
    converted as the teacher's were (`to_rgb`): [3, S, S] uint8 for a fixed-block family (one image),
    the image processor's inputs over all of them for a processor family."""
    imgs = []
    for i, blob in enumerate(files):
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
            imgs.append(to_rgb(img))
        except Exception as e:
            raise CacheError(f"sample {sample}: image {i + 1} of {len(files)} in the cache cannot be decoded ({e})") from e
    if layout.visual is not None:
        return layout.visual.encode(imgs)
    if len(imgs) != 1:
        raise CacheError(f"sample {sample}: {len(imgs)} images; a {layout.arch} student takes one per sample")
    return to_uint8(imgs[0], layout.pixels)


def collate_kd(samples: list[dict], layout: Layout, pad_id: int) -> dict:
    """Right-padded student batch with the teacher's payloads at the matching positions.

    input_ids, attention_mask, labels_mask, image_mask [B, T]; pixel_values (the rows with an image, in
    order; absent when none has one); and, when cached:
    t_ids [B, T, k], t_lp [B, T, k], t_tail [B, T] (top-k caches) or t_ids, t_w [B, T, m] (sampled caches:
    the unbiased weights, 0 on padding) and t_lp (the teacher's log-probs, 0 where not stored), t_res /
    t_vis [B, T] (teacher rows at response / visual positions); t_attn [B_v, L, Q, N], t_qpos [B_v, Q], t_qmask [B_v, Q]; t_hidden [B_v, P, N, D] over the B_v rows
    with an image (text-only rows have no visual payloads; the visual terms skip them).
    """
    B = len(samples)
    ids, attn, lab, img = _right_pad([s["input_ids"] for s in samples], pad_id, [s["response"] for s in samples],
                                     [s["visual"] for s in samples])
    T = ids.shape[1]
    for s in samples:
        cached = int(s["visual"].sum())
        if not cached:
            continue
        own = layout.visual.count(s["pixels"]) if layout.visual is not None else layout.num_image_tokens
        if cached != own:
            raise CacheError(f"sample {s['id']}: the cache has {cached} visual tokens, the student's image inputs make "
                             f"{own}; train a student with the teacher's image processor and visual token count")
    batch = {"sample_ids": [s["id"] for s in samples],
             "input_ids": ids, "attention_mask": attn, "labels_mask": lab, "image_mask": img}
    batch.update(image_inputs([s.get("pixels") for s in samples], layout))
    with_token_types(batch, layout)
    # the visual payloads (t_attn, t_qpos, t_qmask, t_hidden) are stacked over the rows with an image only
    visual = [s for s in samples if int(s["visual"].sum())]
    if "ids" in samples[0]:
        sampled = "weights" in samples[0]
        k = max(s["ids"].shape[1] for s in samples)  # sampled rows and teacher mixtures vary in width
        t_ids = torch.zeros((B, T, k), dtype=torch.long)
        t_lp = torch.zeros((B, T, k)) if sampled else torch.full((B, T, k), -np.log(k), dtype=torch.float32)
        t_w = torch.zeros((B, T, k))
        t_tail = torch.full((B, T), float("-inf"))
        t_res = torch.zeros((B, T), dtype=torch.bool)
        t_vis = torch.zeros((B, T), dtype=torch.bool)
        t_txt = torch.zeros((B, T), dtype=torch.bool)
        for i, s in enumerate(samples):
            pos = torch.from_numpy(s["pos"])
            m = s["ids"].shape[1]
            t_ids[i, pos, :m] = torch.from_numpy(s["ids"])
            if sampled:
                t_w[i, pos, :m] = torch.from_numpy(s["weights"])
                t_lp[i, pos, :m] = torch.from_numpy(np.nan_to_num(s["logprobs"], nan=0.0))
            else:  # several teachers' unions differ in size: the extra slots are padding (-inf)
                t_lp[i, pos, :m] = torch.from_numpy(s["logprobs"])
                t_lp[i, pos, m:] = float("-inf")
                t_tail[i, pos] = torch.from_numpy(s["tail"])
            resp_rows = np.flatnonzero(s["response"]) - 1
            t_res[i, torch.from_numpy(resp_rows)] = True
            on_image = torch.zeros(T, dtype=torch.bool)
            on_image[torch.from_numpy(np.flatnonzero(s["visual"]))] = True
            scored = torch.zeros(T, dtype=torch.bool).index_fill_(0, pos, True)
            t_vis[i] = on_image & scored  # only rows that were scored
            t_txt[i] = scored & ~on_image
        batch.update(t_ids=t_ids, t_lp=t_lp, t_tail=t_tail, t_res=t_res, t_vis=t_vis, t_txt=t_txt)
        if sampled:
            batch["t_w"] = t_w
    if "x_pos" in samples[0]:
        batch.update(cross_rows(samples, T))
    if visual and "attn" in visual[0]:
        Bv = len(visual)
        Q = max(len(s["qpos"]) for s in visual)
        L, H = visual[0]["attn"].shape[:2]
        N = max(s["attn"].shape[-1] for s in visual)  # visual tokens vary per sample in processor families
        t_attn = torch.zeros((Bv, L, H, Q, N))
        qpos = torch.zeros((Bv, Q), dtype=torch.long)
        qmask = torch.zeros((Bv, Q), dtype=torch.bool)
        for i, s in enumerate(visual):
            q = len(s["qpos"])
            t_attn[i, :, :, :q, : s["attn"].shape[-1]] = torch.from_numpy(s["attn"].astype(np.float32))
            qpos[i, :q] = torch.from_numpy(s["qpos"])
            qmask[i, :q] = True
        batch.update(t_attn=t_attn.mean(2), t_qpos=qpos, t_qmask=qmask)
    paired = ["r_input_ids" in s for s in samples]  # preference pairs: every sample of the batch, or none
    if any(paired) and not all(paired):
        lone = samples[paired.index(False)]
        raise CacheError(f"sample {lone['id']} has no preference pair (no `rejected` answer) while others of its batch "
                         "do: give the stage with the `pref` term only paired samples (its `data` / `prompt_regex`)")
    if all(paired):
        r_ids, r_attn, r_lab = _right_pad([s["r_input_ids"] for s in samples], pad_id,
                                          [s["r_response"] for s in samples])
        batch.update(r_input_ids=r_ids, r_attention_mask=r_attn, r_labels_mask=r_lab,
                     t_pref_chosen=torch.tensor([float(s["pref_chosen_lp"].astype(np.float64).sum()) for s in samples]),
                     t_pref_rejected=torch.tensor([float(s["pref_rejected_lp"].astype(np.float64).sum()) for s in samples]))
    if "pooled_text" in samples[0]:
        batch["t_text"] = torch.from_numpy(np.stack([s["pooled_text"].astype(np.float32) for s in samples]))
    if visual and "hidden" in visual[0]:
        n = max(s["hidden"].shape[1] for s in visual)  # [P, N, D] each; zero past a row's own N
        batch["t_hidden"] = torch.from_numpy(np.stack([np.pad(s["hidden"].astype(np.float32),
                                                              ((0, 0), (0, n - s["hidden"].shape[1]), (0, 0)))
                                                       for s in visual]))
    return batch


def cross_rows(samples: list[dict], T: int) -> dict:
    """The aligned spans of a re-tokenised batch (`vlmkd.train.cross.Retokenizer`), flattened over rows:
    x_rows [G] (b * T + the student position meeting each span), the teacher rows x_lp [G, k],
    x_tail [G], and the hybrid's x_exact [G], x_mids, x_mlp [G, k], x_mtail [G] (padding slots -inf)."""
    k = max(s["x_lp"].shape[1] for s in samples)

    def padded(key, fill, dtype):
        return torch.from_numpy(np.concatenate([np.pad(s[key].astype(dtype), ((0, 0), (0, k - s[key].shape[1])),
                                                       constant_values=fill) for s in samples]))

    cat = lambda key, dtype: torch.from_numpy(np.concatenate([s[key].astype(dtype) for s in samples]))  # noqa: E731
    rows = torch.from_numpy(np.concatenate([b * T + s["x_pos"].astype(np.int64) for b, s in enumerate(samples)]))
    return {"x_rows": rows, "x_lp": padded("x_lp", -np.inf, np.float32),
            "x_tail": cat("x_tail", np.float32), "x_exact": cat("x_exact", bool),
            "x_mids": padded("x_mids", 0, np.int64), "x_mlp": padded("x_mlp", -np.inf, np.float32),
            "x_mtail": cat("x_mtail", np.float32)}


def _right_pad(rows: list[np.ndarray], pad_id: int, *flags: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """ids [B, T] (padded with pad_id), attention mask [B, T], and each per-token flag list as [B, T] bool."""
    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    out = [torch.zeros((B, T), dtype=torch.bool) for _ in flags]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(r)
        attn[i, : len(r)] = 1
        for f, src in zip(out, flags, strict=True):
            f[i, : len(r)] = torch.from_numpy(src[i])
    return ids, attn, *out


class CacheSource:
    """Student batches streamed from a teacher cache, resumable at any micro-step.

    With `workers` = 1 the shards are read, decoded and collated in a DataLoader worker process, a few
    batches ahead of the step, so a GPU trainer never waits on decoding; the batches and their order
    are exactly those of `workers` = 0 (decoding on the trainer's thread), and so is resume. "auto"
    (the default): 1 when the student trains on a GPU, 0 on the CPU, where the worker only takes cores
    from the step (measured: docs/PERFORMANCE.md, tools/bench_step.py)."""

    def __init__(self, reader: CacheReader, layout: Layout, pad_id: int, mix: TeacherMix | None = None,
                 workers: int | str = "auto", prefetch: int = 4, stage_readers: dict[str, CacheReader] | None = None,
                 retokenize=None):
        """`stage_readers`: the stages that read their own cache (a recipe stage's `cache:`), by name;
        the several-teacher `mix` applies to the run's cache only. `retokenize`: a
        `vlmkd.train.cross.Retokenizer` (a student with another tokenizer, or the uld term)."""
        if workers == "auto":
            workers = 1 if torch.cuda.is_available() else 0
        if workers not in (0, 1):
            raise RecipeError(f"data workers: 0 (the trainer's thread) or 1 (a decoding process), not {workers}")
        self.reader, self.layout, self.pad_id, self.mix = reader, layout, pad_id, mix
        self.workers, self.prefetch = workers, prefetch
        self._said: set[str] = set()  # stages whose unfielded samples were counted aloud
        self.stage_readers = stage_readers or {}
        self.retokenize = retokenize

    def _stream(self, stage: Stage, skip: int) -> Iterator[dict]:
        seen = 0
        where = f"stage {stage.name}"
        reader = self.stage_readers.get(stage.name, self.reader)
        mix = None if stage.name in self.stage_readers else self.mix
        for epoch in count():
            got = unfielded = 0
            for s in reader.samples(epoch):
                if not accepts(stage.data, stage.data_field, stage.prompt_regex, s["fields"], s["prompt"], where):
                    continue
                unfielded += lacks_field(stage.data, stage.data_field, s["fields"])
                if mix is not None and (s := mix.apply(s)) is None:
                    continue  # not in every teacher's cache (--allow-partial; recorded in rejects.jsonl)
                got += 1
                seen += 1
                if seen <= skip:
                    continue
                if self.retokenize is not None:
                    s = self.retokenize(s)
                if "image" in s:
                    s["pixels"] = student_pixels(s.pop("image"), self.layout, s["id"])
                yield s
            if got == 0:
                raise CacheError(f"{reader.root}: no cached samples for stage {stage.name} (data: {stage.data!r}"
                                 f" by field {stage.data_field!r}, prompt_regex {stage.prompt_regex!r})")
            if epoch == 0 and unfielded and stage.name not in self._said:
                self._said.add(stage.name)
                console.print(f"{where}: {unfielded} of {got} samples have no {stage.data_field!r} field; the stage "
                              f"(data: {stage.data}) takes them too")

    def _dealt(self, stage: Stage, micro_start: int, rank: int, world: int) -> Iterator[dict]:
        stream = self._stream(stage, micro_start * stage.batch_size)
        while True:
            glob = [next(stream) for _ in range(stage.batch_size)]
            yield collate_kd(glob[rank::world], self.layout, self.pad_id)

    def batches(self, si: int, stage: Stage, micro_start: int):
        """This rank's share of each global batch: global batch g is samples [g*B, (g+1)*B) of the
        cache's seeded stream, and rank r takes positions r, r + W, ... of it. So every rank count sees
        the same global batches (a 2-process run follows a 1-process run) and, per epoch, every sample
        exactly once across ranks. Each rank reads all shards to do so (decoding only its own)."""
        rank, world = dist_info()  # here, in the trainer's process: a worker has no process group
        if stage.batch_size % world:
            raise RecipeError(f"stage {stage.name}: batch_size {stage.batch_size} does not split over {world} ranks")
        if self.workers == 0:
            return self._dealt(stage, micro_start, rank, world)
        loader = torch.utils.data.DataLoader(_Batches(self, stage, micro_start, rank, world), batch_size=None,
                                             num_workers=1, prefetch_factor=self.prefetch,
                                             # the worker's seed from a private generator: the trainer's
                                             # global torch RNG is left as it was (same run as workers=0)
                                             generator=torch.Generator().manual_seed(0))
        return iter(loader)


class _Batches(torch.utils.data.IterableDataset):
    """One stage's batch stream, run inside the DataLoader's worker process."""

    def __init__(self, source: CacheSource, stage: Stage, micro_start: int, rank: int, world: int):
        self.source, self.stage, self.micro_start, self.rank, self.world = source, stage, micro_start, rank, world

    def __iter__(self):
        return self.source._dealt(self.stage, self.micro_start, self.rank, self.world)
