"""The quick reproduction (issue: the proof): a small teacher, one cache, SFT vs KD students.

About 9 minutes on 2 cores, so it runs where CI=true (CI sets it) or VLMKD_SLOW=1, and is skipped in a
developer's quick `pytest` otherwise. It asserts only what is robust at this budget: the MDist
student beats the SFT student on held-out NLL and on accuracy (measured 2026-11-26: NLL 0.124 vs
0.373, accuracy 0.836 vs 0.532; logit KD is within noise of SFT, so it is not asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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
    assert res["mdist"]["val_nll"]["mean"] < res["sft"]["val_nll"]["mean"]
    assert res["mdist"]["accuracy"]["mean"] > res["sft"]["accuracy"]["mean"]
    assert res["cost"]["cache_seconds"] > 0 and res["cost"]["teacher_forward_seconds"] > 0
    for f in ("RESULTS.md", "results.png", "curves.png"):
        assert (out / f).stat().st_size > 0
