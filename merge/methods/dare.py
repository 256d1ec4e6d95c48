"""DARE: drop each fusion-vector element with probability 1 - density, rescale survivors by 1 / density.

The drop mask is a pure function of (seed, tensor name, target index, element index): element i of
target j survives when u < density, u = splitmix64(key_j + (i + 1) * 0x9E3779B97F4A7C15) / 2**64 (top 53
bits), key_j = the first 8 bytes (little-endian) of blake2b(f"{seed}/{name}/{j}", digest_size=8). So a merge
is reproducible from its seed whatever the chunking, the order of tensors or the machine.
"""

import hashlib

import numpy as np
import torch

from merge.methods.common import agrees_with_majority, as_weights, mix
from merge.registry import Combine, Fraction, ParameterStream, PerModel, Weight, merge_method

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _uniform(key: int, start: int, n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(start + 1, start + n + 1, dtype=np.uint64) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _key(seed: int, name: str, target: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}/{target}".encode(), digest_size=8).digest(), "little")


@merge_method("dare", paper="https://arxiv.org/abs/2311.03099")
def dare(
    param: ParameterStream,
    *,
    weight: PerModel[Weight] = 1.0,
    density: PerModel[Fraction] = 1.0,
    seed: int = 0,
    rescale: bool = True,
    consensus: bool = False,
    normalize: bool = False,
) -> Combine:
    keys = [_key(seed, param.name, j) for j in range(param.n_targets)]

    def combine(chunk):
        dropped = chunk.deltas.clone()
        for j, d in enumerate(density):
            if d < 1:
                survive = torch.from_numpy(_uniform(keys[j], chunk.start, chunk.size) < d)
                dropped[j] *= survive
                if rescale:
                    dropped[j] /= d
        w = as_weights(weight, chunk.pivot)
        keep = agrees_with_majority(dropped * w[:, None]) if consensus else None
        return chunk.pivot + mix(dropped, w, keep, normalize)

    return combine
