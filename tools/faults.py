"""Fault campaign: what survives kill -9, corrupted shards and hostile input, counted.

On a small shapes set and a tiny Idefics3 teacher built here (or --teacher/--data of your own):
1. the cache job SIGKILLed at N random moments, each followed by a re-run: runs that end with every
   sample exactly once and shards byte-identical to an uninterrupted run's (every other job writes
   through fsspec, `--out file://...`, the write path of every cache URL);
2. the trainer SIGKILLed at N random moments, each resumed: resumes that finish with weights equal to
   an uninterrupted run's (CPU, same seed);
3. random byte flips and truncations of shards and the manifest: corruptions that `cache verify` or
   the reader detect and name;
4. fuzzed manifests (hypothesis): every format vlmkd reads, text-only / several-image / multi-turn
   rows, odd encodings (BOM, UTF-16, a Latin-1 line) and odd images (16-bit, alpha, palette, CMYK,
   EXIF, missing, broken, oversized, URLs): each case read, encoded, batched and run through the
   teacher, ending in samples, a named error or recorded rejects, never a crash or a silent drop;
   then all the cases' rows at once through cache-teacher, a student's training steps and eval,
   with the counts adding up at each;
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
        # every other job writes through fsspec (--out file://...): the write path of every cache URL
        target = f"file://{out.resolve()}" if i % 2 else out
        delay = rng.uniform(1.0, full)  # start-up included: kills land in loading, mid-shard, between shards
        kill_at_random(cache_cmd(teacher, data, target), delay)
        state = json.loads((out / "manifest.json").read_text())["state"] if (out / "manifest.json").exists() else "none"
        subprocess.run(cache_cmd(teacher, data, target), check=True, capture_output=True)
        ids = [s["id"] for s in CacheReader(target, payloads=()).samples()]
        once = len(ids) == len(set(ids)) == n_rows
        same = shard_bytes(out) == want
        ok += once and same
        details.append({"delay_s": round(delay, 2), "out": "fsspec file://" if i % 2 else "folder",
                        "state_at_kill": state, "exactly_once": once, "identical": same})
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


def fuzz_images(folder: Path, image: Path) -> list[str]:
    """Image files as they come: fine, broken, oversized, missing, 16-bit, alpha, palette, CMYK, EXIF-rotated."""
    from PIL import Image

    shutil.copy(image, folder / "ok.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(folder / "huge.png")
    Image.fromarray((np.arange(96 * 80, dtype=np.uint32).reshape(80, 96) * 8).astype(np.uint16)).save(folder / "g16.png")
    Image.new("RGBA", (50, 70), (200, 10, 10, 90)).save(folder / "rgba.png")
    Image.open(image).convert("P").save(folder / "pal.png")
    Image.open(image).convert("CMYK").save(folder / "cmyk.jpg")
    im = Image.open(image).convert("RGB").resize((120, 60))
    exif = im.getexif()
    exif[0x0112] = 8
    im.save(folder / "exif.jpg", exif=exif)
    Image.new("L", (1, 1)).save(folder / "dot.png")
    return ["ok.png", "broken.png", "huge.png", "missing.png", "g16.png", "rgba.png", "pal.png", "cmyk.jpg",
            "exif.jpg", "dot.png", "", "/etc/passwd", "https://example.com/a.jpg"]


def fuzz(work: Path, n: int, image: Path) -> dict:
    """Fuzzed manifests through reading, encoding, batching and a teacher forward per case; then every
    case's rows at once through a real cache job, a student's training steps and eval. Each row must
    end as a sample or a named reject (the counts add up), never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from vlmkd.data.dataset import collate, encode_samples
    from vlmkd.data.manifest import Reject, read_manifest
    from vlmkd.data.rejects import RejectLog
    from vlmkd.errors import DataError
    from vlmkd.teacher.hf_backend import Extraction, HFTeacher

    teacher = HFTeacher(work / "teacher", Extraction(topk=8, attn_layers=[0], hidden_points=["projector", "final"]))
    tok, layout = teacher.tok, teacher.layout
    fuzzdir = work / "fuzz"
    fuzzdir.mkdir(exist_ok=True)
    images = fuzz_images(fuzzdir, image)
    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
        ["<image>", "<image><image>", "", " ", "word " * 300, "\u202e\u0000\ud7ff", "<end_of_utterance>"])
    img = st.sampled_from(images) | st.integers()
    turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant", "system", "robot"]) | st.integers(),
                                  "value": text | st.integers() | st.none()})
    role_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "model", "x"]),
                                       "content": text | st.lists(st.sampled_from(
                                           [{"type": "text", "text": "What shape?"}, {"type": "image"},
                                            {"type": "image", "image": "ok.png"}, {"type": "video"}]), max_size=3)})
    qa = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]
    uid = st.integers(0, 10**9)
    good = st.one_of(  # rows that must be fine: LLaVA, text-only, multi-turn, the other formats
        st.builds(lambda v, im: {"id": f"v{v}", "image": im, "conversations": qa}, uid, st.sampled_from(images[:10])),
        st.builds(lambda v: {"id": f"t{v}", "conversations": [{"from": "human", "value": "What is 2+2?"},
                                                               {"from": "gpt", "value": "four"}]}, uid),
        st.builds(lambda v: {"id": f"m{v}", "image": "ok.png", "conversations": qa + [
            {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "red"}]}, uid),
        st.builds(lambda v: {"messages": [{"role": "user", "content": f"What shape? {v}"},
                                          {"role": "assistant", "content": "circle"}], "images": ["ok.png"]}, uid),
        st.builds(lambda v: {"instruction": f"Name it {v}", "input": "", "output": "circle", "images": ["ok.png"]}, uid),
        st.builds(lambda v: {"id": f"s{v}", "images": ["ok.png", "ok.png"], "conversations": [
            {"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "yes"}]}, uid))
    row = good | st.fixed_dictionaries({}, optional={
        "id": st.text(max_size=12) | st.integers() | st.none(),
        "image": img | st.lists(img, max_size=3),
        "images": st.lists(img, max_size=3) | img,
        "conversations": st.lists(turn, max_size=4) | st.lists(role_turn, max_size=3) | st.text(max_size=5) | st.none(),
        "messages": st.lists(role_turn, max_size=3),
        "instruction": text | st.integers(), "output": text, "history": st.lists(st.lists(text, max_size=3), max_size=2),
    }) | st.integers() | st.text(max_size=8)
    encodings = ["utf-8", "utf-8-bom", "utf-16", "latin-1-line"]
    outcomes = {"sample": 0, "reject": 0, "named_error": 0, "crash": 0, "dropped": 0, "rows": 0}
    crashes: list[str] = []
    all_rows: list[bytes] = []  # every case's JSONL rows, for the end-to-end pass

    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(row, min_size=1, max_size=4), as_jsonl=st.booleans(), enc=st.sampled_from(encodings))
    def case(rows, as_jsonl, enc):
        path = fuzzdir / ("m.JSONL" if as_jsonl else "m.json")
        lines = [json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass") for r in rows]
        if enc == "latin-1-line":  # one row re-encoded as Latin-1 (its own reject on JSONL; the whole file on JSON)
            lines[0] = json.dumps({"id": "caf\xe9", "conversations": qa}, ensure_ascii=False).encode("latin-1")
        body = b"\n".join(lines) if as_jsonl else b"[" + b",".join(lines) + b"]"
        if enc == "utf-8-bom":
            body = b"\xef\xbb\xbf" + body
        elif enc == "utf-16":
            body = body.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
        path.write_bytes(body)
        outcomes["rows"] += len(rows)
        try:
            got = list(read_manifest(path))
            samples = [g for g in got if not isinstance(g, Reject)]
            log = RejectLog(None)
            items = encode_samples(samples, tok, layout, log)
            if items:  # batching and the teacher's forward over the mixed rows
                collate(items, layout, tok.pad_id)
                teacher.extract(items)
            accounted = len(items) + log.count + (len(got) - len(samples))
            if accounted != len(rows):
                outcomes["dropped"] += 1
            outcomes["sample"] += len(items)
            outcomes["reject"] += log.count + len(got) - len(samples)
            if as_jsonl and enc in ("utf-8", "utf-8-bom", "latin-1-line"):
                all_rows.extend(lines)
        except DataError:
            outcomes["named_error"] += 1
        except Exception as e:  # noqa: BLE001 - a crash is what the campaign counts
            outcomes["crash"] += 1
            crashes.append(f"{type(e).__name__}: {str(e)[:160]}")

    case()
    report = {"cases": n, "outcomes": outcomes, "crash_examples": crashes[:5]}
    report["end_to_end"] = fuzz_end_to_end(work, fuzzdir, all_rows)
    report["ok"] = outcomes["crash"] == 0 and outcomes["dropped"] == 0 and report["end_to_end"]["ok"]
    return report


def fuzz_end_to_end(work: Path, fuzzdir: Path, rows: list[bytes]) -> dict:
    """All the fuzz cases' JSONL rows in one manifest: cache-teacher, a student's steps, eval."""
    from vlmkd.cache.reader import CacheReader
    from vlmkd.eval.run import evaluate_model
    from vlmkd.teacher.hf_backend import Extraction
    from vlmkd.teacher.job import CacheJob, run_cache_job
    from vlmkd.train.student import train_student_run

    qa = [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]
    base = []  # good rows of each kind among the fuzzed ones, so that training has a mixed set to run on
    for i in range(8):
        base += [{"id": f"e2e-img{i}", "image": ["ok.png", "g16.png", "exif.jpg", "cmyk.jpg"][i % 4], "conversations": qa},
                 {"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                               {"role": "assistant", "content": str(2 * i)}]},
                 {"id": f"e2e-multi{i}", "image": "rgba.png", "conversations": qa + [
                     {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}]
    rows = [json.dumps(r).encode() for r in base] + rows
    manifest = fuzzdir / "all.jsonl"
    manifest.write_bytes(b"\n".join(rows) + b"\n")
    out: dict = {"rows": len(rows)}
    try:
        cache = work / "fuzz_cache"
        settings = Extraction(topk=8, attn_layers=[0], hidden_points=["projector", "final"])
        man = run_cache_job(CacheJob(work / "teacher", manifest, cache, settings, samples_per_shard=64, val=manifest))
        cached = sum(1 for _ in CacheReader(cache, payloads=("tokens", "image", "attn", "hidden")).samples())
        out["cache"] = {**man["counts"], "read_back": cached}
        recipe = work / "fuzz_recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "fuzz", "model": {
            "arch": "idefics3", "image_size": 96, "scale_factor": 2, "max_positions": 128, "vision_from": "teacher",
            "vision": {"hidden": 32, "layers": 1, "heads": 2, "patch": 16, "intermediate": 64},
            "text": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}},
            "eval_every": 4, "eval_samples": 16, "save_every": 100, "log_every": 1,
            "stages": [{"name": "kd", "steps": 8, "batch_size": 8, "lr": 3e-3, "warmup": 1,
                        "losses": {"ce": 1.0, "res": 1.0, "attn": 1.0, "align": 1.0, "feat": 1.0},
                        "loss_args": {"attn_layers": [0]}}]}))
        res = train_student_run(recipe, cache, work / "fuzz_run")
        steps = [json.loads(x) for x in (work / "fuzz_run" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in steps if r["kind"] == "train"]
        out["train"] = {"steps": len(train), "finite": all(np.isfinite(r["loss"]) for r in train),
                        "evals": sum(r["kind"] == "eval" for r in steps)}
        ev = evaluate_model(res.model_dir, manifest)
        out["eval"] = {k: ev[k] for k in ("rows", "samples", "rejected_rows", "exchanges", "n", "rejected_exchanges")}
        c, e = out["cache"], out["eval"]
        out["ok"] = (c["rows"] == c["samples"] + c["rejects"] == len(rows) and c["read_back"] == c["samples"]
                     and out["train"]["steps"] == 8 and out["train"]["finite"]
                     and e["rows"] == e["samples"] + e["rejected_rows"] and e["exchanges"] == e["n"] + e["rejected_exchanges"])
    except Exception as e:  # noqa: BLE001 - counted, with the reason
        out["ok"] = False
        out["crash"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


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
