"""Logits datasets to and from what other trainers read and other servers write.

Export (`logitfuse store export URI --format F --out DIR`), through `LogitsReader` only:
  parquet  plain logical columns, one row per sample (readable by `datasets.load_dataset("parquet")`,
           polars, DuckDB, pyarrow without logitfuse): sample_id (string), input_ids (list<int32>),
           loss_mask (list<bool>), positions (list<int32>), topk_ids (list<list<int32>>, [N][k]),
           topk_logprobs (list<list<float32>>, [N][k], nats), gold_logprob (list<float32>, [N], nats),
           text (string, null for none), assistant_spans (list<list<int32>>, [S][2]), truncated (bool).
           Position t of `positions` holds the teacher's distribution of token input_ids[t + 1]. The
           dataset's `LogitsMeta` is kept as JSON in each file's schema metadata (`logitfuse.meta`), so the
           export imports back into the same dataset id. Files: `data-00000-of-0000N.parquet`.
  axolotl  axolotl's KD plugin columns over its tokenized chat format: input_ids, attention_mask, labels
           (-100 where loss_mask is false), and one row per token t of target_token_ids / target_logprobs /
           target_mask ([T][k]: row t is the distribution of input_ids[t + 1]; rows with no stored
           distribution, and the last row, hold ids 0..k-1, logprob PAD_LOGPROB and mask 0), plus
           sample_id and text. Files as for parquet.
  hf       a `datasets.Dataset` saved with `save_to_disk` (the parquet columns; `datasets.load_from_disk`):
           ``data-0000i-of-0000n.arrow``, ``dataset_info.json``, ``state.json``.
Every format also gets the dataset's stored tokenizer in ``tokenizer/`` (`AutoTokenizer.from_pretrained`).
Import (`logitfuse store import FILE --format F --store STORE`), through `LogitsWriter` only:
  vllm     JSONL of vLLM OpenAI-compatible completion responses made with `prompt_logprobs: k` and
           `return_token_ids: true` (a `CompletionResponse` per line, or a `vllm run-batch` output line
           whose `response.body` is one); the line's `custom_id` (else the response `id`) is the sample id.
           prompt_logprobs[i] (i >= 1) is the distribution of prompt token i, stored at position i - 1;
           k is the largest rank vLLM returned; the prompt token's own entry gives gold_logprob.
  parquet  the parquet export above (or the same columns written by other tools, with --teacher-name etc.);
           the tokenizer is the export's ``tokenizer/`` unless --tokenizer is given (one of the two is needed:
           fusion and the trainer read the tokenizer stored with the dataset).
Invalid lines (rows) are reported by line number; nothing is written unless every line is valid or
`skip_invalid` is set. The whole export is written into a staging directory renamed into place at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datastore import fs
from datastore.errors import UserError
from datastore.manifest import LogitsMeta, logits_id
from datastore.reader import LogitsReader
from datastore.sample import ScoredSample
from datastore.staging import staged_directory
from datastore.writer import LogitsWriter

ExportFormat = Literal["parquet", "axolotl", "hf"]
ImportFormat = Literal["vllm", "parquet"]
EXPORT_FORMATS = ("parquet", "axolotl", "hf")
IMPORT_FORMATS = ("vllm", "parquet")
META_KEY = b"logitfuse.meta"
FORMAT_KEY = b"logitfuse.format"
PAD_LOGPROB = -1e9  # axolotl: padded target slots carry a large negative logprob and target_mask 0
_ROWS_PER_FILE = 1024


# ------------------------------------------------------------------ arrow helpers


def _offsets(lengths: list[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32), pa.int32())


def _list(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """One list<dtype> per array (1-D)."""
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), pa.array(flat, dtype))


def _nested(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """One list<list<dtype>> per 2-D array [n, m] (rows of m values)."""
    rows = [r for a in arrays for r in a]
    inner = _list(rows, dtype) if rows else pa.ListArray.from_arrays(pa.array([0], pa.int32()), pa.array([], dtype))
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), inner)


def parquet_table(samples: list[ScoredSample]) -> pa.Table:
    """The `parquet` export columns for a batch of samples (module docstring)."""
    return pa.table({
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "input_ids": _list([s.input_ids.astype(np.int32) for s in samples], pa.int32()),
        "loss_mask": _list([s.loss_mask.astype(bool) for s in samples], pa.bool_()),
        "positions": _list([s.positions.astype(np.int32) for s in samples], pa.int32()),
        "topk_ids": _nested([s.topk_ids.astype(np.int32) for s in samples], pa.int32()),
        "topk_logprobs": _nested([s.topk_logprobs.astype(np.float32) for s in samples], pa.float32()),
        "gold_logprob": _list([s.gold_logprob.astype(np.float32) for s in samples], pa.float32()),
        "text": pa.array([s.text for s in samples], pa.string()),
        "assistant_spans": _nested([np.asarray(s.assistant_spans, np.int32).reshape(-1, 2) for s in samples], pa.int32()),
        "truncated": pa.array([bool(s.truncated) for s in samples], pa.bool_()),
    })


def axolotl_table(samples: list[ScoredSample], k: int) -> pa.Table:
    """axolotl's KD columns for a batch of samples (module docstring)."""
    ids, logprobs, masks, labels = [], [], [], []
    for s in samples:
        t = len(s.input_ids)
        row_ids = np.tile(np.arange(k, dtype=np.int32), (t, 1))
        row_lp = np.full((t, k), PAD_LOGPROB, dtype=np.float32)
        row_mask = np.zeros((t, k), dtype=np.int8)
        pos = s.positions.astype(np.int64)
        row_ids[pos] = s.topk_ids
        row_lp[pos] = s.topk_logprobs
        row_mask[pos] = s.loss_mask[pos + 1].astype(np.int8)[:, None]  # axolotl: 0 where labels[t + 1] == -100
        ids.append(row_ids)
        logprobs.append(row_lp)
        masks.append(row_mask)
        labels.append(np.where(s.loss_mask, s.input_ids, -100).astype(np.int32))
    return pa.table({
        "sample_id": pa.array([s.sample_id for s in samples], pa.string()),
        "input_ids": _list([s.input_ids.astype(np.int32) for s in samples], pa.int32()),
        "attention_mask": _list([np.ones(len(s.input_ids), np.int8) for s in samples], pa.int8()),
        "labels": _list(labels, pa.int32()),
        "target_token_ids": _nested(ids, pa.int32()),
        "target_logprobs": _nested(logprobs, pa.float32()),
        "target_mask": _nested(masks, pa.int8()),
        "text": pa.array([s.text for s in samples], pa.string()),
    })


# ------------------------------------------------------------------ export


def export_dataset(uri: str, fmt: str, out: Path | str, *, overwrite: bool = False,
                   rows_per_file: int = _ROWS_PER_FILE, cache_dir: Path | str | None = None) -> int:
    """Writes the logits dataset at `uri` to `out` in format `fmt` (module docstring); returns the number of
    samples. Reads one batch of `rows_per_file` samples at a time. Raises UserError for an unknown format,
    a missing dataset or an `out` that exists (unless `overwrite`). `cache_dir`: where `hf` lets `datasets`
    build its Arrow cache (default: a folder inside the staging directory, removed at the end)."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    reader = LogitsReader(uri)
    meta_json = reader.manifest.meta.model_dump_json().encode()
    k = reader.manifest.meta.k
    n_files = max(1, math.ceil(len(reader) / rows_per_file))
    count = 0
    filesystem, root = fs.resolve(uri)
    inputs = [root] if fs.is_local(filesystem) else []  # --out must not be, hold or lie in the dataset
    with staged_directory(out, overwrite, inputs=inputs) as stage:
        parquet_dir = stage / "_parquet" if fmt == "hf" else stage
        parquet_dir.mkdir(exist_ok=True)
        files = []
        batches = reader.iter_batches(rows_per_file)
        for i in range(n_files):
            batch = next(batches, [])
            table = axolotl_table(batch, k) if fmt == "axolotl" else parquet_table(batch)
            table = table.replace_schema_metadata({
                META_KEY: meta_json, FORMAT_KEY: f"logitfuse.{fmt}-export/1".encode(),
            })
            path = parquet_dir / f"data-{i:05d}-of-{n_files:05d}.parquet"
            pq.write_table(table, path, compression="zstd")
            files.append(path)
            count += len(batch)
        if fmt == "hf":
            import datasets

            cache = Path(cache_dir) if cache_dir else stage / "_cache"
            ds = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache), keep_in_memory=False)
            ds.save_to_disk(str(stage / "dataset"))
            del ds
            import shutil

            shutil.rmtree(parquet_dir)
            if not cache_dir:
                shutil.rmtree(cache, ignore_errors=True)
            for item in (stage / "dataset").iterdir():
                item.rename(stage / item.name)
            (stage / "dataset").rmdir()
        _export_tokenizer(uri, stage)
    return count


def _export_tokenizer(uri: str, stage: Path) -> None:
    """The dataset's stored tokenizer (checked against its log) into ``tokenizer/`` of the export, where
    `import_dataset` finds it and a trainer reading the export can load it; nothing when the dataset
    stores none (one written through the Python API without `fs.save_tokenizer`). Raises UserError when
    the stored files are damaged."""
    from datastore.table import DeltaDataset

    table = DeltaDataset(uri)
    stores_one = (bool(table.snapshot().tokenizer) if table.exists()
                  else bool(fs.list_files(table.fs, fs.join(table.root, fs.TOKENIZER_DIR))))  # a 0.1 dataset
    if stores_one:
        fs.load_tokenizer(uri).save_pretrained(str(stage / fs.TOKENIZER_DIR))


# ------------------------------------------------------------------ import


@dataclass
class ImportReport:
    """What an import did: the dataset written, and every invalid line with its reason."""

    uri: str | None
    written: int = 0
    already_stored: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class _Row:
    line: int
    sample: ScoredSample | None
    error: str | None = None
    model: str | None = None


def _vllm_rows(path: Path) -> Iterator[_Row]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _Row(n, None, f"not UTF-8 text (byte {e.start + 1}); expected a JSON completion response per line")
                continue
            if not text.strip():
                continue
            try:
                yield _vllm_row(n, json.loads(text))
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as e:
                yield _Row(n, None, " ".join(str(e).split())[:300] or type(e).__name__)


def _vllm_row(n: int, obj) -> _Row:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object (a completion response)")
    sample_id = obj.get("custom_id")
    body = obj
    if isinstance(obj.get("response"), dict):  # `vllm run-batch` output
        if obj.get("error"):
            raise ValueError(f"the request failed: {obj['error']}")
        body = obj["response"].get("body") or {}
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("no choices[0] in the response")
    choice = choices[0]
    sample_id = sample_id or body.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        raise ValueError("no sample id (custom_id or id)")
    ids = choice.get("prompt_token_ids")
    if not isinstance(ids, list) or len(ids) < 2:
        raise ValueError("choices[0].prompt_token_ids missing or not >= 2 token ids (request return_token_ids: true)")
    bad = next((i for i, t in enumerate(ids) if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 2**31), None)
    if bad is not None:
        raise ValueError(f"choices[0].prompt_token_ids[{bad}] = {str(ids[bad])[:40]} is not a token id in [0, 2**31)")
    logprobs = choice.get("prompt_logprobs")
    if not isinstance(logprobs, list) or len(logprobs) != len(ids):
        raise ValueError(f"choices[0].prompt_logprobs must be a list of {len(ids)} entries, one per prompt token "
                         "(request prompt_logprobs: k)")
    rows = []
    for i in range(1, len(ids)):
        entry = logprobs[i]
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"prompt_logprobs[{i}] is {entry!r}, expected {{token_id: {{logprob, rank}}}}")
        parsed = []
        for tok, info in entry.items():
            lp = info.get("logprob") if isinstance(info, dict) else None
            rank = info.get("rank") if isinstance(info, dict) else None
            # -inf (a masked token) is a log-probability: the store keeps it at its floor
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp) or lp > 0:
                raise ValueError(f"prompt_logprobs[{i}][{tok}]: logprob {lp!r} is not a finite value <= 0 or -inf")
            if not isinstance(rank, int) or rank < 1:
                raise ValueError(f"prompt_logprobs[{i}][{tok}]: rank {rank!r} is not an integer >= 1")
            parsed.append((int(tok), float(lp), rank))
        gold = [lp for tok, lp, _ in parsed if tok == ids[i]]
        if not gold:
            raise ValueError(f"prompt_logprobs[{i}] lacks the prompt token {ids[i]}")
        rows.append((parsed, ids[i], gold[0]))
    # vLLM returns the top k and, when it is not among them, the prompt token: so the top k are the entries
    # of rank <= k, k being the largest rank of an entry that is not the prompt token.
    other = [rank for parsed, prompt, _ in rows for tok, _, rank in parsed if tok != prompt]
    k = max(other) if other else 1
    topk_ids = np.zeros((len(rows), k), dtype=np.int32)
    topk_lp = np.zeros((len(rows), k), dtype=np.float32)
    for r, (parsed, _, _) in enumerate(rows):
        top = sorted((e for e in parsed if e[2] <= k), key=lambda e: e[2])
        if [e[2] for e in top] != list(range(1, k + 1)):
            raise ValueError(f"prompt_logprobs[{r + 1}] holds ranks {[e[2] for e in top]}, expected 1..{k}")
        topk_ids[r] = [e[0] for e in top]
        topk_lp[r] = [e[1] for e in top]
    t = len(ids)
    sample = ScoredSample(
        sample_id=sample_id,
        input_ids=np.asarray(ids, dtype=np.int32),
        loss_mask=np.ones(t, dtype=bool),
        positions=np.arange(t - 1, dtype=np.int32),
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        gold_logprob=np.asarray([g for _, _, g in rows], dtype=np.float32),
    )
    return _Row(n, sample, model=body.get("model"))


def _parquet_rows(path: Path) -> tuple[Iterator[_Row], dict | None]:
    """Rows of one exported Parquet file, or of every `*.parquet` file of an export directory in name order
    (rows numbered across the files)."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise UserError(f"{path}: a directory without .parquet files (give a `store export --format parquet` "
                            f"directory or one of its files)")
        parts = [_parquet_file_rows(f) for f in files]
        metas = {json.dumps(m, sort_keys=True) for _, m in parts}
        if len(metas) > 1:
            raise UserError(f"{path}: its .parquet files come from different logits datasets; import them one by one")

        def chained() -> Iterator[_Row]:
            n = 0
            for rows, _ in parts:
                for row in rows:
                    n += 1
                    yield _Row(n, row.sample, row.error)

        return chained(), parts[0][1]
    return _parquet_file_rows(path)


def _parquet_file_rows(path: Path) -> tuple[Iterator[_Row], dict | None]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{path}: not a Parquet file ({' '.join(str(e).split())})") from None
    raw_meta = (pf.schema_arrow.metadata or {}).get(META_KEY)
    meta = json.loads(raw_meta) if raw_meta else None
    needed = ["sample_id", "input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob"]
    missing = [c for c in needed if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{path}: missing {'column' if len(missing) == 1 else 'columns'} {', '.join(missing)} (the `store export --format parquet` columns)")
    optional = [c for c in ("text", "assistant_spans", "truncated") if c in pf.schema_arrow.names]

    def rows() -> Iterator[_Row]:
        n = 0
        for batch in pf.iter_batches(batch_size=256, columns=needed + optional):
            for rec in batch.to_pylist():
                n += 1
                try:
                    yield _Row(n, _parquet_sample(rec))
                except (ValueError, TypeError, OverflowError) as e:
                    yield _Row(n, None, " ".join(str(e).split())[:300] or type(e).__name__)

    return rows(), meta


def _parquet_sample(rec: dict) -> ScoredSample:
    for name in ("sample_id", "input_ids", "loss_mask", "positions", "topk_ids", "topk_logprobs", "gold_logprob"):
        if rec.get(name) is None:
            raise ValueError(f"{name} is null")
    topk_ids = np.asarray(rec["topk_ids"], dtype=np.int64)
    n = len(rec["positions"])
    if topk_ids.ndim != 2 and not (n == 0 and topk_ids.size == 0):
        raise ValueError("topk_ids rows have different lengths")
    topk_lp = np.asarray(rec["topk_logprobs"], dtype=np.float32)
    if topk_lp.shape != topk_ids.shape and n:
        raise ValueError(f"topk_logprobs shape {topk_lp.shape} != topk_ids shape {topk_ids.shape}")
    spans = rec.get("assistant_spans")
    return ScoredSample(
        sample_id=rec["sample_id"],
        input_ids=np.asarray(rec["input_ids"], dtype=np.int64).astype(np.int32),
        loss_mask=np.asarray(rec["loss_mask"], dtype=bool),
        positions=np.asarray(rec["positions"], dtype=np.int32),
        topk_ids=topk_ids.reshape(n, -1).astype(np.int32) if n else np.zeros((0, 0), np.int32),
        topk_logprobs=topk_lp.reshape(n, -1) if n else np.zeros((0, 0), np.float32),
        gold_logprob=np.asarray(rec["gold_logprob"], dtype=np.float32),
        text=rec.get("text"),
        assistant_spans=np.asarray(spans if spans else np.zeros((0, 2)), dtype=np.int32).reshape(-1, 2),
        truncated=bool(rec.get("truncated") or False),
    )


def import_dataset(
    path: Path | str,
    fmt: str,
    store: str,
    *,
    tokenizer=None,
    teacher_name: str | None = None,
    dataset_id: str | None = None,
    skip_invalid: bool = False,
    shard_rows: int = 512,
    on_problem: Callable[[str], None] | None = None,
) -> ImportReport:
    """Imports teacher distributions from `path` into a logits dataset in `store` (module docstring).

    `tokenizer` (a transformers tokenizer) is required for `vllm` (its fingerprint goes into the meta and it
    is stored with the dataset, so fusion can align the source); for `parquet` the export's
    ``tokenizer/`` is used when it is None (its export also carries the meta). Every invalid line is passed to `on_problem` and listed in the report; unless
    `skip_invalid`, any invalid line means nothing is written (`report.uri` is None). Raises UserError for
    an unreadable file, an unknown format, missing options, or samples whose k differs."""
    from datastore.codec import validate

    path = Path(path)
    if fmt not in IMPORT_FORMATS:
        raise UserError(f"unknown import format {fmt!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    if fmt == "vllm" and tokenizer is None:
        raise UserError("--format vllm needs --tokenizer (the teacher's tokenizer: a directory or a cached hub id)")
    if fmt == "vllm" and path.is_dir():
        raise UserError(f"{path}: a directory; --format vllm reads one JSONL file of completion responses")
    if not (path.is_file() or (fmt == "parquet" and path.is_dir())):
        raise UserError(f"{path}: no such file")
    if fmt == "vllm" and _starts_with(path, b"PAR1"):
        raise UserError(f"{path}: a Parquet file, not JSONL: use --format parquet (a `store export` file)")
    if tokenizer is None:  # parquet: the export's own copy (`store export` writes it beside its files)
        tokenizer = _exported_tokenizer(path)

    def rows() -> tuple[Iterator[_Row], dict | None]:
        return (_vllm_rows(path), None) if fmt == "vllm" else _parquet_rows(path)

    report = ImportReport(uri=None)
    say = on_problem or (lambda _m: None)
    k_seen: dict[int, int] = {}
    models: set[str] = set()
    ids_seen: set[str] = set()
    valid_lines: set[int] = set()
    max_len = 1
    first_pass, meta_dict = rows()
    for row in first_pass:  # pass 1: validate every line, find k, report every problem
        error = row.error
        if error is None:
            s = row.sample
            k = s.topk_ids.shape[1] if s.topk_ids.ndim == 2 and len(s.positions) else None
            try:
                if k is not None:
                    validate(s, k)
                if tokenizer is not None:
                    _check_ids_fit(s, len(tokenizer))  # input ids: its tokens; top-k: + HEAD_PADDING
            except ValueError as e:
                error = str(e)
            if error is None and s.sample_id in ids_seen:
                error = f"duplicate sample id {s.sample_id!r}"
            if error is None:
                ids_seen.add(s.sample_id)
                valid_lines.add(row.line)
                if k is not None:
                    k_seen[k] = k_seen.get(k, 0) + 1
                max_len = max(max_len, len(s.input_ids))
                if row.model:
                    models.add(row.model)
        if error is not None:
            problem = f"{path}: {'line' if fmt == 'vllm' else 'row'} {row.line}: {error}"
            report.problems.append(problem)
            say(problem)
    if len(k_seen) > 1:
        raise UserError(f"{path}: samples have different top-k sizes ({', '.join(map(str, sorted(k_seen)))}); one "
                        "logits dataset has one k")
    if not valid_lines:
        raise UserError(f"{path}: no valid samples")
    if report.problems and not skip_invalid:
        return report
    k = next(iter(k_seen)) if k_seen else 1
    meta = _import_meta(fmt, path, meta_dict, k, tokenizer, teacher_name or (sorted(models)[0] if models else None),
                        dataset_id, max_len)
    uri = fs.logits_uri(store, logits_id(meta))
    report.uri = uri
    with LogitsWriter(uri, meta, shard_rows) as writer:
        done = writer.done_ids
        for row in rows()[0]:  # pass 2: write the valid ones
            if row.line not in valid_lines:
                continue
            sample = row.sample
            if not len(sample.positions):  # no scored position: empty [0, k] top-k arrays
                sample.topk_ids = np.zeros((0, k), np.int32)
                sample.topk_logprobs = np.zeros((0, k), np.float32)
            if sample.sample_id in done:
                report.already_stored += 1
                continue
            writer.write(sample)
            report.written += 1
    if tokenizer is not None:
        fs.save_tokenizer(uri, tokenizer)
    return report


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _exported_tokenizer(path: Path):
    """The tokenizer a `store export` wrote in ``tokenizer/`` of the export directory (`path` or the folder
    of the file `path`). Raises UserError when there is none: a logits dataset without its tokenizer is
    one that fusion and the trainer cannot use."""
    folder = (path if path.is_dir() else path.parent) / fs.TOKENIZER_DIR
    if not folder.is_dir():
        raise UserError(f"{path}: give --tokenizer (the teacher's tokenizer: a directory or a cached hub id); no "
                        f"{fs.TOKENIZER_DIR}/ beside it, and fusion and the trainer need it stored with the dataset")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


#: how far top-k ids may run past the tokenizer's length: output heads are padded to a round size
#: (Qwen2's 152,064 rows over 151,665 tokens: +399; DeepSeek's 102,400 over ~100,015: +2,385), and fusion
#: counts such ids as unmapped mass
HEAD_PADDING = 4096


def _check_ids_fit(sample: ScoredSample, vocab: int) -> None:
    """ValueError when an input id is not a token of the tokenizer (`vocab` = its length) or a top-k id lies
    more than `HEAD_PADDING` past it."""
    if sample.input_ids.size and int(sample.input_ids.max()) >= vocab:
        raise ValueError(f"input id {int(sample.input_ids.max())} >= the tokenizer's {vocab} tokens")
    top = int(sample.topk_ids.max(initial=-1))
    if top >= vocab + HEAD_PADDING:
        raise ValueError(f"top-k id {top} >= the tokenizer's {vocab} tokens + {HEAD_PADDING} (a padded output "
                         "head's rows): not this tokenizer's model")


def _import_meta(fmt: str, path: Path, stored: dict | None, k: int, tokenizer, teacher_name: str | None,
                 dataset_id: str | None, max_len: int) -> LogitsMeta:
    if stored is not None:
        meta = LogitsMeta.model_validate(stored)
        if meta.k != k:
            raise UserError(f"{path}: its meta says k={meta.k} but the rows hold k={k}")
        if tokenizer is not None:
            from datastore.tokenizers import tokenizer_fingerprint

            if tokenizer_fingerprint(tokenizer) != meta.tokenizer_fingerprint:
                raise UserError(f"{path}: --tokenizer does not match the export's tokenizer fingerprint "
                                f"{meta.tokenizer_fingerprint}")
        return meta
    if tokenizer is None:
        raise UserError(f"{path} carries no logitfuse meta: give --tokenizer (and --teacher-name)")
    if not teacher_name:
        raise UserError(f"{path}: give --teacher-name (the responses name no model)")
    from datastore.chat import file_digest
    from datastore.tokenizers import tokenizer_fingerprint

    digest = file_digest(path)
    return LogitsMeta(
        dataset_id=dataset_id or f"{path.name}@{digest[:12]}",
        teacher_name=teacher_name,
        teacher_revision=f"imported:{fmt}:{digest[:16]}",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        k=k,
        chat_template="none (imported token ids)",
        max_length=max_len,
        all_positions=True,
        extra={"imported_from": fmt, "file": path.name},
    )
