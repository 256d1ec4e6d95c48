"""Sharded safetensors in and out, one contiguous range of elements at a time.

Owns the file format: reading headers (single file or `model.safetensors.index.json`), reading any
element range of a tensor with explicit `pread`s (never a memory map, so file pages sit in the page cache
and never count in this process's RSS), and writing sharded output whose headers are fixed before any data
is written, so every tensor can be streamed to disk chunk by chunk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merge.errors import MergeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files of a checkpoint directory that hold weights; everything else (config, tokenizer, chat template,
# generation config) is copied from the base model to the output.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: BF16, F32, ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the first element in `file`

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, after the `safetensors` library has validated its header (a JSON
    object within its size limit, every entry with a known dtype, a shape and data_offsets that match
    dtype x shape, contiguous and covering the data section exactly). Raises MergeError, one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise MergeError(f"{path}: invalid safetensors file ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot read safetensors file ({e.strerror or e})") from None
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise MergeError(
                f"{path}: tensor {name} has dtype {meta['dtype']}; the merge reads floating tensors only "
                f"({', '.join(SAFETENSORS_DTYPES)})"
            )
        begin, _end = meta["data_offsets"]
        tensors[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path, 8 + size + begin)
    return tensors


class Checkpoint:
    """A model directory's safetensors weights, read tensor range by tensor range."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise MergeError(f"{self.dir}: no such model directory")
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise MergeError(f"{index}: not a safetensors index ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
        elif (self.dir / SINGLE_NAME).is_file():
            weight_map, files = None, [SINGLE_NAME]
        else:
            raise MergeError(f"{self.dir}: no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            path = self.dir / file
            if not path.is_file():
                raise MergeError(f"{index}: lists shard {file}, which is missing")
            for name, info in _read_header(path).items():
                if weight_map is None or weight_map.get(name) == file:
                    self.tensors[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise MergeError(f"{index}: {len(missing)} tensors listed but absent from their shard: {missing[0]}")
        self.config: dict = {}
        config = self.dir / "config.json"
        if config.is_file():
            try:
                self.config = json.loads(config.read_text())
            except ValueError as e:
                raise MergeError(f"{config}: not JSON ({e})") from None
            if not isinstance(self.config, dict):
                raise MergeError(f"{config}: expected a JSON object (a transformers model config), got "
                                 f"{type(self.config).__name__}")
        self._fds: dict[Path, int] = {}

    def read(self, info: TensorInfo, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, in its stored dtype, read with explicit preads."""
        end = info.numel if end is None else end
        size = info.itemsize
        raw = torch.empty((end - start) * size, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        pos, offset = 0, info.offset + start * size
        while pos < len(view):
            n = os.preadv(fd, [view[pos:]], offset + pos)
            if n == 0:
                raise MergeError(f"{info.file}: truncated while reading {info.name}")
            pos += n
        return raw.view(info.torch_dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '20KB' or a byte count -> bytes (decimal units, as transformers uses). Raises
    MergeError for anything else, and for sizes under one byte (0, negative, NaN: one shard per tensor)."""
    bad = MergeError(f"bad size {text!r}: expected a positive number of bytes, or a number with KB, MB, GB or TB")
    if isinstance(text, int):
        size = text
    else:
        units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        s = text.strip().upper()
        unit = next((u for u in units if s.endswith(u)), "")
        try:
            number = float(s[: len(s) - len(unit)]) * units.get(unit, 1)
        except ValueError:
            raise bad from None
        if not math.isfinite(number):
            raise bad
        size = int(number)
    if size < 1:
        raise bad
    return size


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    shard: int = 0
    begin: int = 0  # byte offset inside the shard's data section


class ShardedWriter:
    """Writes tensors, in the planned order and each in ascending chunks, to sharded safetensors + index.

    Shards are written under temporary names and renamed at `close`, so a crash never leaves a directory
    that looks like a complete checkpoint.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self._plan: list[_Planned] = []
        shard, used = 0, 0
        for name, shape, dtype in plan:
            nbytes = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                nbytes *= d
            if used and used + nbytes > max_shard_bytes:
                shard, used = shard + 1, 0
            self._plan.append(_Planned(name, tuple(shape), dtype, nbytes, shard, used))
            used += nbytes
        self.n_shards = shard + 1
        self.total_size = sum(p.nbytes for p in self._plan)
        self._next = 0  # index in plan of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._fd: int | None = None
        self._open_shard = -1

    def shard_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def _open(self, shard: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        header: dict = {"__metadata__": {"format": "pt"}}
        for p in self._plan:
            if p.shard == shard:
                header[p.name] = {
                    "dtype": DTYPE_CODES[p.dtype],
                    "shape": list(p.shape),
                    "data_offsets": [p.begin, p.begin + p.nbytes],
                }
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        path = self.out_dir / (self.shard_name(shard) + ".tmp")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # & ~umask
        self._write_all(struct.pack("<Q", len(blob)) + blob)
        self._open_shard = shard

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while len(view):
            view = view[os.write(self._fd, view) :]

    def write(self, name: str, values: torch.Tensor) -> None:
        """Appends the next chunk of tensor `name` (any shape; it is flattened and cast to the planned dtype)."""
        while self._next < len(self._plan) and self._plan[self._next].nbytes == 0:
            self._next += 1
        p = self._plan[self._next]
        if p.name != name:
            raise RuntimeError(f"writer expected {p.name}, got {name}")
        if self._open_shard != p.shard:
            self._open(p.shard)
        data = values.reshape(-1).to(p.dtype).contiguous().view(torch.uint8).numpy()
        if self._written + len(data) > p.nbytes:
            raise RuntimeError(f"{name}: more data than its shape holds")
        self._write_all(data)
        self._written += len(data)
        if self._written == p.nbytes:
            self._next, self._written = self._next + 1, 0

    def close(self) -> None:
        while self._next < len(self._plan) and self._plan[self._next].nbytes == 0:
            self._next += 1
        if self._next != len(self._plan):
            raise RuntimeError(f"writer closed before {self._plan[self._next].name} was written")
        for shard in range(self.n_shards):
            if self._open_shard < shard:  # shards holding only empty tensors still need a header
                self._open(shard)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for shard in range(self.n_shards):
            tmp = self.out_dir / (self.shard_name(shard) + ".tmp")
            os.replace(tmp, self.out_dir / self.shard_name(shard))
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {p.name: self.shard_name(p.shard) for p in self._plan},
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(base_dir: Path, out_dir: Path, out_dtype: torch.dtype | None) -> list[str]:
    """Copies the base's config, tokenizer and other non-weight files; records a changed dtype in config.json."""
    copied = []
    for path in sorted(Path(base_dir).iterdir()):
        if not path.is_file() or path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES:
            continue
        shutil.copyfile(path, out_dir / path.name)
        copied.append(path.name)
    config = out_dir / "config.json"
    if out_dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        name = str(out_dtype).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["torch_dtype"]
        for key in keys:
            data[key] = name
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied
