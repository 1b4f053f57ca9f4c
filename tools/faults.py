"""Fault campaign: what survives kill -9, corrupted shards and hostile input, counted.

On a small shapes set and a tiny Idefics3 teacher built here (or --teacher/--data of your own):
1. the cache job SIGKILLed at N random moments, each followed by a re-run: runs that end with every
   sample exactly once and shards byte-identical to an uninterrupted run's;
2. the trainer SIGKILLed at N random moments, each resumed: resumes that finish with weights equal to
   an uninterrupted run's (CPU, same seed);
3. random byte flips and truncations of shards and the manifest: corruptions that `cache verify` or
   the reader detect and name;
4. fuzzed manifest rows (hypothesis): cases ending in a sample, a named error or a recorded reject,
   never a crash or a silent drop;
5. hostile shards (`../` and absolute member names, a symlink, a pickled .npy): each refused, named.

    python tools/faults.py --quick --json faults.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

PY = sys.executable


def setup(work: Path) -> tuple[Path, Path]:
    """A shapes set and a tiny teacher (briefly trained, so its distributions are not uniform)."""
    from vlmkd.data.items import load_items
    from vlmkd.data.manifest import load_samples
    from vlmkd.data.rejects import RejectLog
    from vlmkd.data.shapes import write_dataset
    from vlmkd.models.build import build_model, data_tokenizer
    from vlmkd.models.tokenizer import train_tokenizer
    from vlmkd.train.loop import ItemSource, train
    from vlmkd.train.recipe import parse_recipe

    data = work / "data"
    write_dataset(data, {"train": 150, "val": 20}, seed=3, caption_every={"train": 3})
    samples, _ = load_samples(data / "train.json")
    tok = train_tokenizer([t.text.replace("<image>", "") for s in samples for t in s.turns])
    spec = {"arch": "idefics3", "image_size": 96, "scale_factor": 2, "max_positions": 128,
            "vision": {"hidden": 32, "layers": 1, "heads": 2, "patch": 16, "intermediate": 64},
            "text": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128}}
    model = build_model(spec, tok)
    dt, lay = data_tokenizer(model, tok)
    items = load_items(data / "train.json", dt, lay, RejectLog(None), show=False)
    recipe = parse_recipe({"name": "t", "model": spec, "eval_every": 1000, "save_every": 1000,
                           "stages": [{"name": "s", "steps": 30, "lr": 3e-3, "warmup": 3, "batch_size": 16}]})
    res = train(recipe, model, tok, dt, lay, ItemSource(items, lay, dt.pad_id, 0), items[:4], work / "trun",
                model_out=work / "teacher")
    return res.model_dir, data / "train.json"


def cache_cmd(teacher, data, out):
    return [PY, "-m", "vlmkd", "cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--backend", "hf", "--k", "16", "--score-visual", "--samples-per-shard", "16", "--batch-size", "8",
            "--threads", "1"]


def shard_bytes(cache: Path) -> list[tuple[str, str]]:
    m = json.loads((cache / "manifest.json").read_text())
    return [(s["name"], hashlib.sha256((cache / s["name"]).read_bytes()).hexdigest()) for s in m["shards"]]


def kill_at_random(cmd, delay: float) -> None:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


def cache_kills(teacher, data, work: Path, n: int, rng: random.Random) -> dict:
    from vlmkd.cache.reader import CacheReader

    ref = work / "cache_ref"
    t = time.time()
    subprocess.run(cache_cmd(teacher, data, ref), check=True, capture_output=True)
    full = time.time() - t
    want = shard_bytes(ref)
    n_rows = len(json.loads(Path(data).read_text()))
    ok, details = 0, []
    for i in range(n):
        out = work / f"cache_kill{i}"
        delay = rng.uniform(1.0, full)  # start-up included: kills land in loading, mid-shard, between shards
        kill_at_random(cache_cmd(teacher, data, out), delay)
        state = json.loads((out / "manifest.json").read_text())["state"] if (out / "manifest.json").exists() else "none"
        subprocess.run(cache_cmd(teacher, data, out), check=True, capture_output=True)
        ids = [s["id"] for s in CacheReader(out, payloads=()).samples()]
        once = len(ids) == len(set(ids)) == n_rows
        same = shard_bytes(out) == want
        ok += once and same
        details.append({"delay_s": round(delay, 2), "state_at_kill": state, "exactly_once": once, "identical": same})
        shutil.rmtree(out)
    return {"runs": n, "exact": ok, "uninterrupted_s": round(full, 1), "details": details}


def trainer_kills(cache: Path, val: Path, work: Path, n: int, rng: random.Random) -> dict:
    from safetensors.torch import load_file

    spec = {"arch": "idefics3", "image_size": 96, "scale_factor": 2, "max_positions": 128, "vision_from": "teacher",
            "vision": {"hidden": 32, "layers": 1, "heads": 2, "patch": 16, "intermediate": 64},
            "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}}
    recipe = work / "student.yaml"
    recipe.write_text(yaml.safe_dump({"name": "s", "model": spec, "eval_every": 1000, "eval_samples": 4,
                                      "save_every": 3, "log_every": 1, "stages": [
                                          {"name": "a", "data": "captions", "steps": 9, "batch_size": 4, "lr": 2e-3,
                                           "losses": {"ce": 1, "res": 1}},
                                          {"name": "b", "data": "questions", "steps": 9, "batch_size": 4, "lr": 2e-3,
                                           "losses": {"ce": 1, "res": 1, "vis": 1}}]}))

    def cmd(out):
        return [PY, "-m", "vlmkd", "train-student", "--recipe", str(recipe), "--cache", str(cache), "--out", str(out),
                "--val", str(val), "--threads", "1"]

    ref = work / "train_ref"
    t = time.time()
    subprocess.run(cmd(ref), check=True, capture_output=True)
    full = time.time() - t
    want = load_file(str(ref / "model" / "model.safetensors"))
    ok, details = 0, []
    for i in range(n):
        out = work / f"train_kill{i}"
        delay = rng.uniform(2.0, full)
        kill_at_random(cmd(out), delay)
        r = subprocess.run(cmd(out), capture_output=True, text=True)
        finished = r.returncode == 0
        equal = False
        if finished:
            got = load_file(str(out / "model" / "model.safetensors"))
            equal = all(np.array_equal(want[k].numpy(), got[k].numpy()) for k in want)
        ok += finished and equal
        details.append({"delay_s": round(delay, 2), "finished": finished, "weights_equal": equal,
                        **({} if finished else {"error": r.stderr[-300:]})})
        shutil.rmtree(out)
    return {"runs": n, "equal": ok, "uninterrupted_s": round(full, 1), "details": details}


def corruptions(cache: Path, work: Path, n: int, rng: random.Random) -> dict:
    from vlmkd.cache.reader import CacheReader
    from vlmkd.errors import CacheError

    detected = named = 0
    kinds: dict[str, int] = {}
    m = json.loads((cache / "manifest.json").read_text())
    for _ in range(n):
        bad = work / "corrupt"
        if bad.exists():
            shutil.rmtree(bad)
        shutil.copytree(cache, bad)
        target_manifest = rng.random() < 0.1
        name = "manifest.json" if target_manifest else rng.choice(m["shards"])["name"]
        path = bad / name
        data = bytearray(path.read_bytes())
        kind = rng.choice(["flip", "truncate"])
        if kind == "flip":
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        else:
            data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        label = f"{'manifest' if target_manifest else 'shard'}-{kind}"
        kinds[label] = kinds.get(label, 0) + 1
        try:
            problems = CacheReader(bad).verify_all()
            found = bool(problems)
            says = any(name in p for p in problems)
        except CacheError as e:  # the manifest itself is unreadable: refused, naming the file
            found, says = True, name in str(e)
        except Exception:  # a flip in the manifest JSON that still parses but breaks a field's type
            found, says = False, False
        detected += found
        named += found and says
    shutil.rmtree(work / "corrupt", ignore_errors=True)
    return {"trials": n, "detected": detected, "named": named, "kinds": kinds}


def hostile(cache: Path, work: Path) -> dict:
    from vlmkd.cache.reader import CacheReader
    from vlmkd.errors import CacheError

    m = json.loads((cache / "manifest.json").read_text())
    cases = {}
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zstandard

    pickled_blob = zstandard.ZstdCompressor().compress(pickled.getvalue())
    for label, name, kind, payload in [
        ("dotdot", "../0000000000.meta.json", "file", b"{}"),
        ("absolute", "/tmp/0000000000.meta.json", "file", b"{}"),
        ("symlink", "0000000000.meta.json", "symlink", b""),
        ("pickled_npy", "0000000000.hidden.npy.zst", "file", pickled_blob),
    ]:
        bad = work / f"hostile_{label}"
        shutil.copytree(cache, bad)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            if label == "pickled_npy":  # a sample that is valid but for its pickled hidden-state member
                from vlmkd.cache import format as fmt

                for member, blob in [("0000000000.meta.json", json.dumps({"id": "x", "tokens": 1}).encode()),
                                     ("0000000000.tokens.npy.zst",
                                      fmt.encode_tokens(np.array([1]), np.array([False]), np.array([False])))]:
                    ti0 = tarfile.TarInfo(member)
                    ti0.size = len(blob)
                    tar.addfile(ti0, io.BytesIO(blob))
            ti = tarfile.TarInfo(name)
            if kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(ti)
            else:
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
        data = buf.getvalue()
        shard = m["shards"][0]["name"]
        (bad / shard).write_bytes(data)
        mm = json.loads((bad / "manifest.json").read_text())
        mm["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        from vlmkd.cache.manifest import write_manifest

        write_manifest(bad / "manifest.json", mm)  # a consistent manifest: only the shard is hostile
        try:
            list(CacheReader(bad, payloads=("tokens", "hidden") if label == "pickled_npy" else ("tokens",)).samples())
            cases[label] = {"refused": False}
        except CacheError as e:
            cases[label] = {"refused": True, "named": (name.split("/")[-1] in str(e)) or (shard in str(e)),
                            "message": str(e)[:160]}
        shutil.rmtree(bad)
    return cases


def fuzz(work: Path, n: int, image: Path) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from PIL import Image

    from vlmkd.data.dataset import encode_samples
    from vlmkd.data.manifest import Reject, read_manifest
    from vlmkd.data.rejects import RejectLog
    from vlmkd.errors import DataError
    from vlmkd.models.build import data_tokenizer, load_model

    model, hf = load_model(work / "teacher")
    tok, layout = data_tokenizer(model, hf)
    fuzzdir = work / "fuzz"
    fuzzdir.mkdir(exist_ok=True)
    shutil.copy(image, fuzzdir / "ok.png")
    (fuzzdir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(fuzzdir / "huge.png")
    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
        ["<image>", "<image><image>", "", " ", "word " * 300, "\u202e\u0000\ud7ff", "<end_of_utterance>"])
    turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant", "system", "robot"]) | st.integers(),
                                  "value": text | st.integers() | st.none()})
    valid = {"id": "v", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat shape?"},
                                                             {"from": "gpt", "value": "circle"}]}
    good = st.builds(lambda v: {**valid, "id": f"v{v}"}, st.integers(0, 10**6))  # some rows must be fine
    row = good | st.fixed_dictionaries({}, optional={
        "id": st.text(max_size=12) | st.integers() | st.none(),
        "image": st.sampled_from(["ok.png", "broken.png", "huge.png", "missing.png", "", "/etc/passwd"]) | st.integers(),
        "conversations": st.lists(turn, max_size=4) | st.text(max_size=5) | st.none()}) | st.integers() | st.text(max_size=8)
    outcomes = {"sample": 0, "reject": 0, "named_error": 0, "crash": 0, "dropped": 0}
    crashes = []

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(row, min_size=1, max_size=4), as_jsonl=st.booleans())
    def case(rows, as_jsonl):
        path = fuzzdir / ("m.jsonl" if as_jsonl else "m.json")
        path.write_text("\n".join(json.dumps(r) for r in rows) if as_jsonl else json.dumps(rows))
        try:
            got = list(read_manifest(path))
            samples = [g for g in got if not isinstance(g, Reject)]
            log = RejectLog(None)
            items = encode_samples(samples, tok, layout, log)
            accounted = len(items) + log.count + (len(got) - len(samples))
            if accounted != len(rows):
                outcomes["dropped"] += 1
            outcomes["sample"] += len(items)
            outcomes["reject"] += log.count + len(got) - len(samples)
        except DataError:
            outcomes["named_error"] += 1
        except Exception as e:  # noqa: BLE001 - a crash is what the campaign counts
            outcomes["crash"] += 1
            crashes.append(f"{type(e).__name__}: {str(e)[:120]}")

    case()
    cases = n
    return {"cases": cases, "outcomes": outcomes, "crash_examples": crashes[:5],
            "ok": outcomes["crash"] == 0 and outcomes["dropped"] == 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 2 kills, 100 corruptions, 100 fuzz cases")
    ap.add_argument("--kills", type=int)
    ap.add_argument("--trials", type=int)
    ap.add_argument("--fuzz", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    kills = args.kills or (2 if args.quick else 10)
    trials = args.trials or (100 if args.quick else 1000)
    nfuzz = args.fuzz or (100 if args.quick else 1000)
    rng = random.Random(args.seed)
    work = args.keep or Path(tempfile.mkdtemp(prefix="vlmkd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    teacher, data = setup(work)
    report = {"cache_kills": cache_kills(teacher, data, work, kills, rng)}
    print("cache kills:", {k: v for k, v in report["cache_kills"].items() if k != "details"}, flush=True)
    cache = work / "cache_ref"
    report["trainer_kills"] = trainer_kills(cache, data.parent / "val.json", work, kills, rng)
    print("trainer kills:", {k: v for k, v in report["trainer_kills"].items() if k != "details"}, flush=True)
    report["corruptions"] = corruptions(cache, work, trials, rng)
    print("corruptions:", report["corruptions"], flush=True)
    report["hostile"] = hostile(cache, work)
    print("hostile:", {k: v["refused"] for k, v in report["hostile"].items()}, flush=True)
    report["fuzz"] = fuzz(work, nfuzz, data.parent / "images/train/000000.png")
    print("fuzz:", report["fuzz"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
