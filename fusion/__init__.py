"""fusion: token alignment of source distributions to the pivot's tokenization and vocabulary, and their
fusion (MinCE / AvgCE) into training targets. Pure functions over `datastore.sample.ScoredSample`; the
``logitfuse fuse`` command reads and writes the shards around them."""

from datastore._lazy import lazy_exports

# imported on first use (PEP 562): the CLI imports this package's light modules only
_EXPORTS = {
    "SparseDist": "fusion._sparse",
    "ALIGN_METHODS": "fusion.align",
    "AlignedDistributions": "fusion.align",
    "Alignment": "fusion.align",
    "AlignmentError": "fusion.align",
    "align_distributions": "fusion.align",
    "align_dtw": "fusion.align",
    "align_gold_nll": "fusion.align",
    "pivot_gold_nll": "fusion.align",
    "align_sample": "fusion.align",
    "align_spans": "fusion.align",
    "byte_spans": "fusion.align",
    "token_offsets": "fusion.align",
    "AVGCE_WEIGHTS": "fusion.fuse",
    "FUSION_METHODS": "fusion.fuse",
    "FusionResult": "fusion.fuse",
    "cross_entropy": "fusion.fuse",
    "fuse_sample": "fusion.fuse",
    "gold_ids": "fusion.fuse",
    "response_mask": "fusion.fuse",
    "ExactMatch": "fusion.vocab",
    "MappingStatistics": "fusion.vocab",
    "MinEditDistance": "fusion.vocab",
    "StatisticsMap": "fusion.vocab",
    "TokenTable": "fusion.vocab",
    "VocabMap": "fusion.vocab",
    "build_vocab_map": "fusion.vocab",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
