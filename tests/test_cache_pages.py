"""`vlmkd cache show` and `cache report`: the numbers on the pages are the cache's (checked against the
reader and an independent float64 computation), text-only and sampled caches, several caches side by
side, and both pages opened in a real headless Chromium (drawn, no script errors)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmkd.cache.pages import figures, report_html, show_html
from vlmkd.cache.reader import CacheReader
from vlmkd.cache.view import cache_report, reason_kind, sample_view
from vlmkd.teacher.hf_backend import Extraction
from vlmkd.teacher.job import CacheJob, run_cache_job


def _page_data(page: str):
    m = re.search(r'<script type="application/json" id="vlmkd-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def caches(trained_tiny_teacher, shapes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    rows = json.loads((shapes_dir / "train.json").read_text())[:30]
    for r in rows:
        r["image"] = str(shapes_dir / r["image"])
    rows += [{"id": "text-only", "conversations": [{"from": "human", "value": "What is two and two?"},
                                                   {"from": "gpt", "value": "four"}]},
             {"id": "gone-1", "image": "/nowhere/a.png", "conversations": rows[0]["conversations"]},
             {"id": "gone-2", "image": "/nowhere/b.png", "conversations": rows[0]["conversations"]}]
    manifest = root / "m.json"
    manifest.write_text(json.dumps(rows))
    out = {}
    for name, settings in {"topk": Extraction(topk=16, score_visual=True, attn_layers=[0, 1], hidden_points=[]),
                           "topk8": Extraction(topk=8, score_visual=True, attn_layers=[0], hidden_points=[]),
                           "sampled": Extraction(logits="sampled", draws=20, attn_layers=[], hidden_points=[])}.items():
        out[name] = root / name
        run_cache_job(CacheJob(trained_tiny_teacher, manifest, out[name], settings, samples_per_shard=16))
    out["first"] = rows[0]["id"]
    return out


def test_sample_page_numbers_are_the_caches(caches):
    sid = caches["first"]
    page = show_html([sample_view(caches["topk"], sid)])
    (v,) = _page_data(page)
    s = next(x for x in CacheReader(caches["topk"], payloads=("tokens", "topk", "attn")).samples() if x["id"] == sid)
    assert [t["t"] for t in v["tokens"]] == list(range(len(s["input_ids"])))
    assert [r["pos"] for r in v["scored"]] == s["pos"].tolist()
    for r, row in enumerate(v["scored"]):
        lp = s["logprobs"][r].astype(np.float64)
        want = sorted(zip(s["ids"][r].tolist(), np.exp(lp).tolist(), strict=True), key=lambda x: -x[1])
        assert [(i, p) for _, i, p in row["top"]] == want  # exactly the stored values
        assert row["tail"] == float(np.exp(np.float64(s["tail"][r])))
        p = np.exp(lp)  # the entropy by hand: kept ids plus the tail as one bucket
        t = np.exp(np.float64(s["tail"][r]))
        h = -(p * np.log(p)).sum() - (t * np.log(t) if t > 0 else 0.0)
        assert row["entropy"] == pytest.approx(h, rel=1e-12) and row["top1"] == pytest.approx(p.max(), rel=1e-12)
        assert row["visual"] == bool(s["visual"][row["pos"]])
    maps = s["attn"].astype(np.float64).mean(1)
    assert np.array_equal(np.array(v["attention"]["maps"]), maps)
    assert v["attention"]["qpos"] == s["qpos"].tolist() and v["attention"]["layers"] == [0, 1]
    assert len(v["visual_rows"]) == int(s["visual"].sum())  # score_visual: one row per visual token
    img = v["image"]
    assert img["width"] == 96 and img["data_uri"].startswith("data:image/png;base64,")
    assert sid in page and "Attention over the image" in page
    assert not re.search(r"(src|href)=['\"](https?:|//)", page) and "<link" not in page  # self-contained


def test_text_only_sampled_and_side_by_side(caches):
    v = sample_view(caches["topk"], "text-only")
    assert v["image"] is None and "attention" not in v and "visual_rows" not in v
    assert "text-only sample: no image" in show_html([v])
    s = sample_view(caches["sampled"], caches["first"])
    reader = next(x for x in CacheReader(caches["sampled"], payloads=("tokens", "sampled")).samples()
                  if x["id"] == caches["first"])
    for r, row in enumerate(s["scored"]):
        w = reader["weights"][r]
        assert sorted(d[2] for d in row["draws"]) == pytest.approx(sorted(w[w > 0].tolist()))
        assert sum(d[2] for d in row["draws"]) == pytest.approx(1.0)  # t = 1: counts / draws
    both = show_html([sample_view(caches["topk"], caches["first"]), sample_view(caches["topk8"], caches["first"])])
    views = _page_data(both)
    assert [len(v["scored"][0]["top"]) for v in views] == [16, 8] and "view1" in both
    with pytest.raises(Exception, match="no sample 'nope'"):
        sample_view(caches["topk"], "nope")


def test_report_numbers_are_the_caches(caches, tmp_path):
    rep = cache_report(caches["topk"])
    m = json.loads((caches["topk"] / "manifest.json").read_text())
    scored = sum(s["scored_tokens"] for s in m["shards"])
    assert rep["summary"]["samples"] == 31 and rep["summary"]["rejects"] == 2
    h = rep["histograms"]
    assert sum(h["response"]["entropy"]["counts"]) + sum(h["visual"]["entropy"]["counts"]) == scored
    assert sum(h["response"]["top1"]["counts"]) == h["response"]["top1"]["n"]
    (group,) = rep["rejects"]  # the two missing images: one reason, two examples
    assert group["count"] == 2 and {e["id"] for e in group["examples"]} == {"gone-1", "gone-2"}
    assert "does not exist" in group["reason"] and "/nowhere" not in group["reason"]
    assert rep["sample_kinds"] == {"image": 30, "text-only": 1}
    pngs = figures(rep)
    assert set(pngs) == {"distributions.png", "shards.png"}
    for blob in pngs.values():
        assert blob.startswith(b"\x89PNG")
    page = report_html(rep, pngs)
    assert "31" in page and "does not exist" in page and page.count("data:image/png;base64,") == 2
    assert reason_kind("/d/m.jsonl:7 (sample s1): turn 2 has unknown role 'robot'") == \
        reason_kind("/d/m.jsonl:9 (sample s9): turn 0 has unknown role 'x'")
    ids = rep["ids_per_row"]  # a fixed-k cache: every row holds its 16 ids
    assert ids["response"]["mean"] == ids["visual"]["mean"] == 16 and ids["response"]["at_k"] == 1.0
    assert ids["response"]["rows"] + ids["visual"]["rows"] == scored and "ids per visual row" in page
    sampled = cache_report(caches["sampled"])
    assert "no entropy histograms" in sampled["note"]
    assert 1 <= sampled["ids_per_row"]["response"]["mean"] <= 20 and sampled["ids_per_row"]["response"]["at_k"] is None


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it from Debian)")
def test_pages_open_in_a_real_browser(caches, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "vlmkd", "cache", *a], capture_output=True, text=True)  # noqa: E731
    r = run("show", str(caches["topk"]), str(caches["topk8"]), "--sample", caches["first"],
            "--out", str(tmp_path / "show.html"), "--json", str(tmp_path / "show.json"))
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "show.json").read_text())) == 2
    r = run("report", str(caches["topk"]), "--out", str(tmp_path / "report.html"), "--png-dir", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "png" / "distributions.png").is_file()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1600",
             "--enable-logging=stderr", "--v=0"]
    for page, canvases in (("show", 6), ("report", 0)):
        url = f"file://{tmp_path / page}.html"
        dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=3000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
        body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
        assert 'data-ready="1"' in body, body  # the page's script ran to its end
        assert "data-errors" not in body and "Uncaught" not in dom.stderr, (body, dom.stderr[-2000:])
        if canvases:
            assert f'data-drawn="{canvases}"' in body, body  # overlay + entropy + top-1, for each cache
        shot = tmp_path / f"{page}.png"
        subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        assert px.std() > 20  # something is drawn, not a blank page
        if page == "show":
            red = (px[..., 0] > px[..., 1] + 60) & (px[..., 0] > px[..., 2] + 60)
            assert red.sum() > 5000, red.sum()  # the heat map over the image
