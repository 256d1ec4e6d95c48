"""TIES: trim each fusion vector to its largest-magnitude elements, elect a sign, mix the agreeing ones;
the mixed vector is scaled by `lambda` (mergekit's name) before it is added to the pivot."""

from merge.methods.common import agrees_with_majority, as_weights, mix
from merge.registry import Combine, Fraction, ParameterStream, PerModel, Weight, merge_method


@merge_method("ties", paper="https://arxiv.org/abs/2306.01708")
def ties(
    param: ParameterStream,
    *,
    weight: PerModel[Weight] = 1.0,
    density: PerModel[Fraction] = 1.0,
    normalize: bool = True,
    lambda_: Weight = 1.0,
) -> Combine:
    # Trim: per target, keep the top `density` of elements by |delta| (k = int(density * numel)).
    kept = [
        param.select_top(lambda c, j=j: c.deltas[j].abs(), d) if d < 1 else None for j, d in enumerate(density)
    ]

    def combine(chunk):
        trimmed = chunk.deltas.clone()
        for j, selection in enumerate(kept):
            if selection is not None:
                trimmed[j] *= selection.mask(chunk)
        w = as_weights(weight, chunk.pivot)
        keep = agrees_with_majority(trimmed * w[:, None])
        mixed = mix(trimmed, w, keep, normalize)
        return chunk.pivot + (mixed * lambda_ if lambda_ != 1 else mixed)

    return combine
