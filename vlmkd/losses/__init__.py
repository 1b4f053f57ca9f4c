"""The public KD losses: pure functions of tensors, each with its formula and source in its module.

See docs/API.md for arguments, shapes and reductions.
"""

from vlmkd.losses.attention import attention_kd, focus_align, text_focus, top_focus_align
from vlmkd.losses.contrastive import info_nce, pooled
from vlmkd.losses.feature import feature_kd
from vlmkd.losses.logit import LOSSES, SAMPLED_LOSSES, logit_kd, sampled_kd
from vlmkd.losses.mixture import MIX_MODES, mix_topk
from vlmkd.losses.preference import preference_kd
from vlmkd.losses.relation import relation_kd, relation_matrix
from vlmkd.losses.schedule import linear_temperature
from vlmkd.losses.sft import response_ce

__all__ = [
    "LOSSES",
    "MIX_MODES",
    "SAMPLED_LOSSES",
    "attention_kd",
    "feature_kd",
    "focus_align",
    "info_nce",
    "linear_temperature",
    "logit_kd",
    "mix_topk",
    "pooled",
    "preference_kd",
    "relation_kd",
    "relation_matrix",
    "response_ce",
    "sampled_kd",
    "text_focus",
    "top_focus_align",
]
