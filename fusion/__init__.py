"""fusion: token alignment of source distributions to the pivot's tokenization and vocabulary, and their
fusion (MinCE / AvgCE) into training targets. Pure functions over `datastore.sample.ScoredSample`; the
``logitfuse fuse`` command reads and writes the shards around them."""

from fusion._sparse import SparseDist
from fusion.align import (
    ALIGN_METHODS,
    AlignedDistributions,
    Alignment,
    AlignmentError,
    align_distributions,
    align_dtw,
    align_gold_nll,
    align_sample,
    align_spans,
    byte_spans,
    pivot_gold_nll,
    token_offsets,
)
from fusion.fuse import (
    AVGCE_WEIGHTS,
    FUSION_METHODS,
    FusionResult,
    cross_entropy,
    fuse,
    fuse_sample,
    gold_ids,
    response_mask,
)
from fusion.vocab import (
    ExactMatch,
    MappingStatistics,
    MinEditDistance,
    StatisticsMap,
    TokenTable,
    VocabMap,
    build_vocab_map,
)

__all__ = [
    "ALIGN_METHODS",
    "AVGCE_WEIGHTS",
    "FUSION_METHODS",
    "AlignedDistributions",
    "Alignment",
    "AlignmentError",
    "ExactMatch",
    "FusionResult",
    "MappingStatistics",
    "MinEditDistance",
    "SparseDist",
    "StatisticsMap",
    "TokenTable",
    "VocabMap",
    "align_sample",
    "align_distributions",
    "align_dtw",
    "align_gold_nll",
    "align_spans",
    "build_vocab_map",
    "byte_spans",
    "cross_entropy",
    "fuse",
    "fuse_sample",
    "gold_ids",
    "pivot_gold_nll",
    "response_mask",
    "token_offsets",
]
