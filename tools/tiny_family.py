"""A tiny random model of any supported family (the test suite's sizes: 2 + 2 layers, width 64, the
family's special tokens and chat template in a locally trained tokenizer) and a mixed data file
(single-image rows of four sizes, multi-turn rows, two-image rows, text-only rows), so the support
matrix can be tried and benchmarked without a model hub:

    python tools/tiny_family.py --family internvl --out /tmp/internvl
    python tools/bench_teacher.py --teacher /tmp/internvl/model --data /tmp/internvl/data.json --samples 24 --k 8 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("what color is the shape circle square triangle red green blue yellow left right top bottom "
         "how many shapes are there one two three describe the image a small large").split()
SIZES = [(96, 96), (200, 120), (40, 300), (1000, 700)]


def spec_of(family: str) -> dict:
    return {"arch": family, "max_positions": 1024, "image_size": 128 if family == "mistral3" else 64,
            "vision": {"hidden": 32, "layers": 2, "heads": 2, "patch": 8, "merge": 2, "intermediate": 64},
            "text": {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 128,
                     "sliding_window": 12, "global_every": 2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, help="a model_type vlmkd supports (vlmkd.models.families)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single-images", action="store_true",
                    help="no two-image rows (vLLM's LLaVA-OneVision backend refuses them)")
    args = ap.parse_args()

    from vlmkd.models.build import build_model, save_model
    from vlmkd.models.families import family_of
    from vlmkd.models.tokenizer import train_family_tokenizer

    fam = family_of(args.family)
    if fam.tokens is None:
        raise SystemExit(f"{args.family} is a demo layout: `vlmkd demo` builds its models")
    tok = train_family_tokenizer([" ".join(WORDS)] * 4, fam.tokens, vocab_size=400)
    model_dir = save_model(build_model(spec_of(args.family), tok), tok, args.out / "model")
    rng = np.random.default_rng(args.seed)
    images = []
    for i, (w, h) in enumerate(SIZES):
        p = args.out / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        images.append(str(p))
    q = {"from": "human", "value": "<image>\nWhat color is the circle?"}
    rows = []
    for i in range(args.rows):
        kind = i % 4
        if kind == 3:
            rows.append({"id": f"t{i}", "conversations": [{"from": "human", "value": "how many shapes are there?"},
                                                          {"from": "gpt", "value": "two"}]})
        elif kind == 2 and not args.single_images:
            rows.append({"id": f"m{i}", "images": images[:2], "messages": [
                {"role": "user", "content": "<image><image>What color is the circle?"},
                {"role": "assistant", "content": WORDS[8 + i % 4]}]})
        else:
            conv = [q, {"from": "gpt", "value": WORDS[8 + i % 4]}]
            if kind == 1:
                conv += [{"from": "human", "value": "how many shapes are there?"}, {"from": "gpt", "value": "two"}]
            rows.append({"id": f"r{i}", "image": images[i % len(images)], "conversations": conv})
    (args.out / "data.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {model_dir} and {args.out / 'data.json'} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
