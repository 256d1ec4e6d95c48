"""DARE: drop each fusion-vector element with probability 1 - density, rescale the survivors.

Three names: `dare` (ours: rescale by 1 / density, the paper's; `consensus` picks the TIES sign election),
and mergekit's `dare_linear` / `dare_ties` (no consensus / TIES sign election), which rescale as mergekit
0.1.5 does: each dropped fusion vector is scaled so its L1 norm over the matrix equals the L1 norm before
dropping (no rescaling when either norm is below 1e-7). `rescale_to` switches between the two rules.

The drop mask is a pure function of (seed, tensor name, target index, element index): element i of
target j survives when u < density, u = splitmix64(key_j + (i + 1) * 0x9E3779B97F4A7C15) / 2**64 (top 53
bits), key_j = the first 8 bytes (little-endian) of blake2b(f"{seed}/{name}/{j}", digest_size=8). So a merge
is reproducible from its seed whatever the chunking, the order of tensors or the machine. mergekit draws its
masks from torch's global RNG instead, so the two agree in distribution, not element by element.
"""

import hashlib
from typing import Literal

import numpy as np
import torch

from merge.methods.common import agrees_with_majority, as_weights, mix
from merge.registry import Combine, Fraction, ParameterStream, PerModel, Weight, merge_method

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_L1_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` eps
RescaleTo = Literal["density", "l1"]


def _uniform(key: int, start: int, n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(start + 1, start + n + 1, dtype=np.uint64) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _key(seed: int, name: str, target: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}/{target}".encode(), digest_size=8).digest(), "little")


def _dare(
    param: ParameterStream,
    weight: list[float],
    density: list[float],
    seed: int,
    rescale: bool,
    rescale_to: RescaleTo,
    consensus: bool,
    normalize: bool,
    scale: float,
) -> Combine:
    keys = [_key(seed, param.name, j) for j in range(param.n_targets)]

    def dropped(chunk) -> torch.Tensor:
        out = chunk.deltas.clone()
        for j, d in enumerate(density):
            if d < 1:
                out[j] *= torch.from_numpy(_uniform(keys[j], chunk.start, chunk.size) < d)
        return out

    factor = torch.ones(param.n_targets, dtype=torch.float64)
    if rescale and rescale_to == "density":
        factor = torch.tensor([1 / d for d in density], dtype=torch.float64)
    elif rescale:
        before = param.total(lambda c: c.deltas.abs())
        after = param.total(lambda c: dropped(c).abs_())
        for j in range(param.n_targets):
            if before[j] >= _L1_EPS and after[j] >= _L1_EPS:
                factor[j] = before[j] / after[j]

    def combine(chunk):
        d = dropped(chunk)
        d *= factor.to(d.dtype)[:, None]
        w = as_weights(weight, chunk.pivot)
        keep = agrees_with_majority(d * w[:, None]) if consensus else None
        mixed = mix(d, w, keep, normalize)
        return chunk.pivot + (mixed * scale if scale != 1 else mixed)

    return combine


@merge_method("dare", paper="https://arxiv.org/abs/2311.03099")
def dare(
    param: ParameterStream,
    *,
    weight: PerModel[Weight] = 1.0,
    density: PerModel[Fraction] = 1.0,
    seed: int = 0,
    rescale: bool = True,
    rescale_to: RescaleTo = "density",
    consensus: bool = False,
    normalize: bool = False,
    lambda_: Weight = 1.0,
) -> Combine:
    return _dare(param, weight, density, seed, rescale, rescale_to, consensus, normalize, lambda_)


@merge_method("dare_linear", paper="https://arxiv.org/abs/2311.03099")
def dare_linear(
    param: ParameterStream,
    *,
    weight: PerModel[Weight] = 1.0,
    density: PerModel[Fraction] = 1.0,
    seed: int = 0,
    rescale: bool = True,
    rescale_to: RescaleTo = "l1",
    normalize: bool = False,
    lambda_: Weight = 1.0,
) -> Combine:
    return _dare(param, weight, density, seed, rescale, rescale_to, False, normalize, lambda_)


@merge_method("dare_ties", paper="https://arxiv.org/abs/2311.03099")
def dare_ties(
    param: ParameterStream,
    *,
    weight: PerModel[Weight] = 1.0,
    density: PerModel[Fraction] = 1.0,
    seed: int = 0,
    rescale: bool = True,
    rescale_to: RescaleTo = "l1",
    normalize: bool = False,
    lambda_: Weight = 1.0,
) -> Combine:
    return _dare(param, weight, density, seed, rescale, rescale_to, True, normalize, lambda_)
