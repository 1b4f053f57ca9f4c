"""Loss terms as components (vlmkd.train.terms): typed options, misspelt keys refused by name, the
payloads each term asks for, and the wiring: a teacher distilled into itself (student = the teacher's
weights, cache from the same teacher) gives every KD term ~0, and the cache's rows shifted by one
position make them large, so an off-by-one between the cache and the student cannot pass."""

from __future__ import annotations

import pytest
import torch

from vlmkd.cache.reader import CacheReader
from vlmkd.errors import RecipeError
from vlmkd.models.build import data_tokenizer, load_model
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job
from vlmkd.train.kd_data import CacheSource
from vlmkd.train.objectives import KDObjective, cache_facts
from vlmkd.train.recipe import load_recipe, parse_recipe


def _stage(losses, args):
    return parse_recipe({"model": {}, "stages": [{"name": "kd", "steps": 1, "losses": losses, "loss_args": args}]})


@pytest.mark.parametrize("args, msg", [
    ({"temprature": 4.0}, r"unknown loss_args key 'temprature' \(did you mean 'temperature'\?\)"),
    ({"logit_los": "rkl"}, r"unknown loss_args key 'logit_los' \(did you mean 'logit_loss'\?\)"),
    ({"logit_loss": "xkl"}, r"logit_loss 'xkl': choose one of"),
    ({"temperature": "hot"}, r"loss_args.temperature = 'hot' is not"),
    ({"attn_kind": "mse"}, r"loss_args.attn_kind is read by the term\(s\) \['attn'\], which this stage does not use"),
    ({"logit_impl": "cuda"}, r"logit_impl 'cuda': choose one of"),
])
def test_misspelt_or_misplaced_options_are_refused_by_name(args, msg):
    with pytest.raises(RecipeError, match=msg):
        _stage({"ce": 1.0, "res": 1.0}, args)


def test_unknown_term_is_refused_with_the_known_ones():
    with pytest.raises(RecipeError, match=r"unknown loss term\(s\) \['mdist'\]; known: \['balance', 'ce'"):
        _stage({"mdist": 1.0}, {})


def test_every_shipped_recipe_parses():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "pipelines"
    recipes = [f for f in sorted(root.rglob("*.yaml")) if f.name != "cache.yaml" and f.parent.name != "models"]
    assert len([f for f in recipes if "ablations" in f.parts]) == 11  # tools/ablations.py's rows
    for f in recipes:
        load_recipe(f)


@pytest.fixture(scope="module")
def self_cache(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcache")
    settings = Extraction(topk=64, score_visual=True, attn_layers=[0, 1],
                          hidden_points=["projector", "final", "layer:0", "layer:1"])
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "train.json", out, settings, samples_per_shard=64))
    return out


LOSSES = {"res": 1.0, "vis": 1.0, "rel": 1.0, "attn": 1.0, "align": 1.0, "feat": 1.0}


def _terms_on_self(teacher_dir, cache, args=None, shift=0):
    """Each KD term of the teacher as its own student on one cached batch; `shift` moves every cached
    row one position later (what an off-by-one in the wiring would do)."""
    recipe = parse_recipe({"model": {"path": str(teacher_dir)}, "stages": [
        {"name": "kd", "steps": 1, "batch_size": 8, "data": "all", "losses": LOSSES,
         "loss_args": args or {"attn_kind": "mse", "feat_point": "final"}}]})
    stage = recipe.stages[0]
    model, hf_tok = load_model(teacher_dir)
    model.eval()
    tok, layout = data_tokenizer(model, hf_tok)
    head = CacheReader(cache, payloads=())
    objective = KDObjective(model, cache_facts(head), recipe.stages)
    assert set(objective.payloads) == {"tokens", "image", "topk", "attn", "hidden"}
    for m in objective.proj.values():  # the learned maps as identities: equal widths here
        torch.nn.init.eye_(m.weight)
    reader = CacheReader(cache, payloads=objective.payloads)
    batch = next(CacheSource(reader, layout, tok.pad_id, workers=0).batches(0, stage, 0))
    if shift:
        for key in ("t_res", "t_vis"):
            batch[key] = torch.roll(batch[key], shift, dims=1)
        for key in ("t_ids", "t_lp", "t_tail"):
            batch[key] = torch.roll(batch[key], shift, dims=1)
        batch["t_hidden"] = torch.roll(batch["t_hidden"], shift, dims=2)
        batch["t_attn"] = torch.roll(batch["t_attn"], shift, dims=-1)
    with torch.no_grad():
        return {k: float(v) for k, v in objective(stage, model, batch).items()}


@pytest.mark.parametrize("args", [
    None,  # vlmkd's defaults
    {"attn_kind": "kl_raw", "align_kind": "authors", "focus_layers": [0], "align_top_k": 4, "feat_point": "final"},
], ids=["vlmkd", "align_kd_authors"])
def test_teacher_distilled_into_itself_gives_every_term_zero_and_a_shift_is_caught(trained_tiny_teacher, self_cache,
                                                                                     args):
    same = _terms_on_self(trained_tiny_teacher, self_cache, args)
    print("aligned:", same)
    # float16 hidden states / attention and the 8-bit top-k codes are the only differences
    assert same["res"] < 2e-3 and same["vis"] < 2e-3, same
    for k in ("rel", "attn", "align", "feat"):
        assert abs(same[k]) < 1e-4, (k, same)
    shifted = _terms_on_self(trained_tiny_teacher, self_cache, args, shift=1)
    print("shifted by one position:", shifted)
    for k in LOSSES:
        assert shifted[k] > 20 * max(same[k], 1e-8), (k, same[k], shifted[k])


def test_a_term_refuses_a_cache_without_its_payload(trained_tiny_teacher, self_cache):
    model, _ = load_model(trained_tiny_teacher)
    head = CacheReader(self_cache, payloads=())
    for losses, args, msg in [({"contrast": 1.0}, {"contrast_on": ["text"]}, "--text-pool"),
                              ({"feat": 1.0}, {"feat_point": "layer:3"}, r"--hidden-points projector,final,layer:0,"
                                                                         r"layer:1,layer:3"),
                              ({"attn": 1.0}, {"attn_layers": [2]}, r"--attn-layers 0,1,2")]:
        recipe = parse_recipe({"model": {}, "stages": [{"name": "s", "steps": 1, "losses": losses, "loss_args": args}]})
        with pytest.raises(RecipeError, match=msg):
            KDObjective(model, cache_facts(head), recipe.stages)


def test_all_position_logit_kd_reads_every_text_row_of_a_score_text_cache(trained_tiny_teacher, shapes_dir, tmp_path):
    """`score_text` caches the teacher's rows at every position that predicts a text token (prompt and
    response, Align-KD's all-position logit KD); they are the teacher's own distributions, the `txt`
    term of the teacher distilled into itself is ~0 and a one-position shift is caught; `txt` on a
    cache without them is refused naming the option."""
    import numpy as np

    from vlmkd.data.dataset import collate, model_inputs
    from vlmkd.data.items import load_items
    from vlmkd.data.rejects import RejectLog

    cache = tmp_path / "cache"
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "val.json", cache,
                           Extraction(topk=64, score_text=True, attn_layers=[], hidden_points=[], gram=False)))
    model, hf_tok = load_model(trained_tiny_teacher)
    model.eval()
    tok, layout = data_tokenizer(model, hf_tok)
    items = {it.sample.id: it for it in load_items(shapes_dir / "val.json", tok, layout, RejectLog(None), show=False)}
    kls, n = [], 0
    for s in CacheReader(cache, payloads=("tokens", "topk")).samples():
        it = items[s["id"]]
        visual = np.asarray(it.enc.image_mask, dtype=bool)
        assert np.array_equal(s["pos"], np.flatnonzero(~visual[:-1]))  # every text row, none visual
        with torch.no_grad():
            full = torch.log_softmax(model(**model_inputs(collate([it], layout, tok.pad_id))).logits[0].double(), -1)
        for r, pos in enumerate(s["pos"]):
            p = full[pos].exp()
            p_top = p[torch.from_numpy(s["ids"][r])]
            p_tail = (1 - p_top.sum()).clamp_min(1e-300)
            kls.append(float((p_top * (p_top.log() - torch.from_numpy(s["logprobs"][r]).double())).sum()
                             + p_tail * (p_tail.log() - float(s["tail"][r]))))
        n += 1
    assert n == 30 and np.mean(kls) < 1e-3, np.mean(kls)

    recipe = parse_recipe({"model": {"path": str(trained_tiny_teacher)}, "stages": [
        {"name": "kd", "steps": 1, "batch_size": 8, "data": "all", "losses": {"txt": 1.0, "res": 1.0}}]})
    stage = recipe.stages[0]
    objective = KDObjective(model, cache_facts(CacheReader(cache, payloads=())), recipe.stages)
    batch = next(CacheSource(CacheReader(cache, payloads=objective.payloads), layout, tok.pad_id,
                             workers=0).batches(0, stage, 0))
    assert batch["t_txt"].sum() > 2 * batch["t_res"].sum() and bool((batch["t_txt"] | ~batch["t_res"]).all())
    with torch.no_grad():
        same = {k: float(v) for k, v in objective(stage, model, batch).items()}
        for key in ("t_txt", "t_res", "t_ids", "t_lp", "t_tail"):
            batch[key] = torch.roll(batch[key], 1, dims=1)
        shifted = {k: float(v) for k, v in objective(stage, model, batch).items()}
    print("txt aligned / shifted:", same, shifted)
    assert same["txt"] < 2e-3 and shifted["txt"] > 20 * max(same["txt"], 1e-8)
    plain = tmp_path / "plain"
    run_cache_job(CacheJob(trained_tiny_teacher, shapes_dir / "val.json", plain,
                           Extraction(topk=8, attn_layers=[], hidden_points=[], gram=False)))
    with pytest.raises(RecipeError, match="--score-text"):
        KDObjective(model, cache_facts(CacheReader(plain, payloads=())), recipe.stages)
