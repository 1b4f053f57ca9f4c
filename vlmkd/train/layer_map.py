"""Hierarchical layer distillation: which student layer learns from which teacher layer.

A stage's `loss_args.layer_map` pairs student decoder layers with teacher decoder layers; the `feat`
term then aligns each pair's visual hidden states (the cache's `layer:t` points, through one learned
map per pair) and the `attn` term each pair's text-to-vision attention (the cache's attention layers).

    layer_map: uniform                         # student layer i <- teacher layer round((i+1) Lt/Ls) - 1
    layer_map: {kind: last_k, k: 2}            # the last k student layers <- the last k teacher layers
    layer_map: {kind: explicit, pairs: [[0, 1], [1, 3]]}
"""

from __future__ import annotations

from vlmkd.errors import RecipeError

KINDS = ("uniform", "last_k", "explicit")


def layer_pairs(spec, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """[(student layer, teacher layer)], 0-based, from a recipe's layer_map."""
    spec = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise RecipeError(f"layer_map kind {kind!r}: choose one of {KINDS}")
    if kind == "uniform":
        pairs = [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
    elif kind == "last_k":
        k = int(spec.pop("k", 1))
        if not 1 <= k <= min(n_student, n_teacher):
            raise RecipeError(f"layer_map last_k: k = {k} must be in 1..{min(n_student, n_teacher)} "
                              f"(student {n_student} layers, teacher {n_teacher})")
        pairs = [(n_student - k + j, n_teacher - k + j) for j in range(k)]
    else:
        pairs = [tuple(int(x) for x in p) for p in spec.pop("pairs", [])]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise RecipeError("layer_map explicit: `pairs` must list [student layer, teacher layer] pairs")
        for s, t in pairs:
            if not (0 <= s < n_student and 0 <= t < n_teacher):
                raise RecipeError(f"layer_map pair [{s}, {t}]: the student has layers 0..{n_student - 1}, "
                                  f"the teacher 0..{n_teacher - 1}")
    if spec:
        raise RecipeError(f"layer_map {kind}: unknown key(s) {sorted(spec)}")
    return [(int(s), int(t)) for s, t in pairs]
