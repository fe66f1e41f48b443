"""The small, non-kernel pieces of the seed methods (``../shared/reference/methods.md`` §2-§4):

* filter attention, its regularisers, ranking, pruning, folding and training phases (Mo et al. 2019);
* classifier initialisation from semantic (Lin, Wu-Palmer) or visual class similarity (Pascal et al. 2019);
* mentor -> mentee probes by module name and annealed loss weights (Venkatesan & Li 2016).
"""

from .classifier_init import init_classifier_from_similarity, similarity_weights, visual_similarity
from .filter_attention import (
    FilterAttentionConv2d,
    FilterRanking,
    add_filter_attention,
    apply_phase,
    attention_phases,
    filter_attention_layers,
    filter_attention_penalty,
    fold_filter_attention,
    prune_filters,
    rank_filters,
)
from .probes import FeatureTap, ProbePairs
from .schedules import AnnealedWeight
from .semantic import Hierarchy, semantic_similarity

__all__ = [
    "AnnealedWeight",
    "FeatureTap",
    "FilterAttentionConv2d",
    "FilterRanking",
    "Hierarchy",
    "ProbePairs",
    "add_filter_attention",
    "apply_phase",
    "attention_phases",
    "filter_attention_layers",
    "filter_attention_penalty",
    "fold_filter_attention",
    "init_classifier_from_similarity",
    "prune_filters",
    "rank_filters",
    "semantic_similarity",
    "similarity_weights",
    "visual_similarity",
]
