"""The quick reproduction (issue: the proof): a small teacher, one cache, SFT vs KD students.

About 9 minutes on 2 cores, so it runs where CI=true (CI sets it) or VLMKD_SLOW=1, and is skipped in a
developer's quick `pytest` otherwise. It guards the project's headline with a calibrated gap, not just
its sign: MDist must beat SFT by at least MIN_ACC_GAP in test accuracy and reach at most
MAX_NLL_RATIO of SFT's held-out NLL. Calibration (docs/RESULTS.md, "Guard"): on this pipeline MDist
leads SFT by 0.30 in accuracy with 1/3 of its NLL; over the full demo's teachers and seeds the smallest
MDist lead measured is the 0.05 of the regression this test must catch (issue: the headline does not
reproduce, MDist 0.597 vs SFT 0.534, NLL 0.323 vs 0.374). The thresholds sit between the two, with
room for the spread of a teacher trained on another machine. Logit KD is within noise of SFT at this
budget, so it is not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIN_ACC_GAP = 0.15  # mdist - sft, test accuracy
MAX_NLL_RATIO = 0.6  # mdist / sft, held-out NLL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("CI") != "true" and os.environ.get("VLMKD_SLOW") != "1",
                       reason="~8 min: runs in CI (CI=true) or with VLMKD_SLOW=1"),
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
    assert res["teacher"]["accuracy"] > res["sft"]["accuracy"]["mean"]  # room for the teacher to matter
    mdist, sft = res["mdist"], res["sft"]
    print("quick reproduction:", {n: (res[n]["accuracy"]["mean"], res[n]["val_nll"]["mean"]) for n in ("sft", "mdist")})
    assert mdist["accuracy"]["mean"] - sft["accuracy"]["mean"] >= MIN_ACC_GAP, (mdist["accuracy"], sft["accuracy"])
    assert mdist["val_nll"]["mean"] <= MAX_NLL_RATIO * sft["val_nll"]["mean"], (mdist["val_nll"], sft["val_nll"])
    assert res["cost"]["cache_seconds"] > 0 and res["cost"]["teacher_forward_seconds"] > 0
    for f in ("RESULTS.md", "results.png", "curves.png"):
        assert (out / f).stat().st_size > 0
