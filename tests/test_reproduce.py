"""The quick reproduction (issue: the proof): a small teacher, one cache, SFT vs KD students.

About 35 minutes on 2 cores (both regimes), so it runs where CI=true (CI sets it) or VLMKD_SLOW=1, and is skipped in a
developer's quick `pytest` otherwise. It guards the project's headline with calibrated gaps, not just
a sign. The quick teacher is trained in the test's own environment, and how well it learns moves with
the torch build (the same recipe and seed: 0.898 with the CPU torch, 0.676 with PyPI's CUDA build
that the README installs, which runs on the CPU), so the guard asks what KD must give whatever the
teacher: MDist must recover at least MIN_RECOVERED of the teacher's accuracy lead over SFT, lead SFT
by at least MIN_ACC_GAP, and reach at most MAX_NLL_RATIO of SFT's held-out NLL. Calibration
(docs/RESULTS.md, "Guard"): CPU torch: recovered 1.01, lead +0.36, NLL ratio 0.36; CUDA build: 0.86,
+0.16, 0.63; the regression this test must catch (issue: the headline does not reproduce, MDist 0.597
vs SFT 0.534 from teacher B at 0.818, NLL 0.323 vs 0.374): 0.22, +0.06, 0.86. The thresholds sit between.
Logit KD is within noise of SFT at this budget, so it is not asserted.

The pretrained-student rows (tools/ablations.py's papers' regime: the image first, teacher and student
LLMs pretrained on text; ~25 more minutes) guard what that regime gives (docs/RESULTS.md, first
section): the image-first teacher learnt (it leads its SFT student by MIN_TEACHER_LEAD; 0.790 vs 0.591
measured), text pretraining gives the student a better language model (its SFT held-out NLL at most
MAX_PRETRAINED_NLL_RATIO of the scratch regime's SFT: 0.28 vs 0.38 measured), and MDist in DFT does not
fall below SFT (within PRETRAINED_KD_SLACK: its gain there is within a few SDs, so a larger one is not
asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIN_TEACHER_LEAD = 0.10  # teacher - sft, test accuracy: below it the quick teacher did not learn
MIN_RECOVERED = 0.5  # (mdist - sft) / (teacher - sft)
MIN_ACC_GAP = 0.10  # mdist - sft, test accuracy
MAX_NLL_RATIO = 0.75  # mdist / sft, held-out NLL
MAX_PRETRAINED_NLL_RATIO = 0.85  # pretrained-regime sft / scratch sft, held-out NLL
PRETRAINED_KD_SLACK = 0.03  # pretrained mdist >= pretrained sft - this, in accuracy (and NLL within 3 %)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CI") != "true" and os.environ.get("VLMKD_SLOW") != "1",
                       reason="~35 min: runs in CI (CI=true) or with VLMKD_SLOW=1"),
]


def test_quick_reproduction_kd_beats_sft(tmp_path):
    out = tmp_path / "repro"
    subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT)
    res = json.loads((out / "results.json").read_text())
    for name in ("sft", "logit_kd", "mdist"):
        assert (out / "students" / name / "seed0" / "model" / "config.json").is_file()
        assert res[name]["runs"] == 1
        assert res[name]["step_seconds"]["mean"] > 0
    mdist, sft = res["mdist"], res["sft"]
    teacher, m, s = res["teacher"]["accuracy"], mdist["accuracy"]["mean"], sft["accuracy"]["mean"]
    print("quick reproduction:", {"teacher": teacher, **{n: (res[n]["accuracy"]["mean"], res[n]["val_nll"]["mean"])
                                                         for n in ("sft", "mdist")}})
    assert teacher - s >= MIN_TEACHER_LEAD, f"the quick teacher ({teacher:.3f}) barely leads SFT ({s:.3f}): it did not learn"
    assert (m - s) / (teacher - s) >= MIN_RECOVERED, (teacher, m, s)
    assert m - s >= MIN_ACC_GAP, (mdist["accuracy"], sft["accuracy"])
    assert mdist["val_nll"]["mean"] <= MAX_NLL_RATIO * sft["val_nll"]["mean"], (mdist["val_nll"], sft["val_nll"])
    assert res["cost"]["cache_seconds"] > 0 and res["cost"]["teacher_forward_seconds"] > 0
    pre = res["pretrained"]
    p_teacher = pre["teacher"]["accuracy"]
    p_sft, p_kd = pre["llava_kd/sft"], pre["llava_kd/mdist"]
    print("pretrained regime:", {"teacher": p_teacher, **{n: (pre[n]["accuracy"]["mean"], pre[n]["val_nll"]["mean"])
                                                           for n in ("llava_kd/sft", "llava_kd/mdist")}})
    assert (out / "pretrained" / "student_lm" / "config.json").is_file()
    assert p_teacher - p_sft["accuracy"]["mean"] >= MIN_TEACHER_LEAD, "the image-first teacher did not learn"
    assert p_sft["val_nll"]["mean"] <= MAX_PRETRAINED_NLL_RATIO * sft["val_nll"]["mean"], (p_sft, sft["val_nll"])
    assert p_kd["accuracy"]["mean"] >= p_sft["accuracy"]["mean"] - PRETRAINED_KD_SLACK, (p_kd, p_sft)
    assert p_kd["val_nll"]["mean"] <= 1.03 * p_sft["val_nll"]["mean"], (p_kd["val_nll"], p_sft["val_nll"])
    for f in ("RESULTS.md", "results.png", "curves.png"):
        assert (out / f).stat().st_size > 0
