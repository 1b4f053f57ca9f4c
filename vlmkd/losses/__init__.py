"""The public KD losses: pure functions of tensors, each with its formula and source in its module.

See docs/API.md for arguments, shapes and reductions.
"""

from vlmkd.losses.attention import attention_kd, focus_align, resample_grid, text_focus
from vlmkd.losses.contrastive import info_nce, pooled
from vlmkd.losses.feature import feature_kd
from vlmkd.losses.logit import LOSSES, SAMPLED_LOSSES, logit_kd, sampled_kd
from vlmkd.losses.preference import preference_kd
from vlmkd.losses.relation import relation_kd, relation_matrix
from vlmkd.losses.schedule import AdaptiveWeights, linear_temperature
from vlmkd.losses.sft import response_ce

__all__ = [
    "LOSSES",
    "SAMPLED_LOSSES",
    "AdaptiveWeights",
    "attention_kd",
    "feature_kd",
    "focus_align",
    "info_nce",
    "linear_temperature",
    "logit_kd",
    "pooled",
    "preference_kd",
    "relation_kd",
    "relation_matrix",
    "resample_grid",
    "response_ce",
    "sampled_kd",
    "text_focus",
]
