"""`logitfuse fuse` / `fuse_logits` end to end on real logits datasets: tiny teachers of two tokenizers
extracted through the datastore, fused, read back as targets and checked value by value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cache_dir
from typer.testing import CliRunner

from clients.cli import app
from clients.corpus import chat_samples, write_jsonl
from clients.tiny_models import make_teacher
from datastore.chat import load_dataset
from datastore.errors import UserError
from datastore.reader import LogitsReader
from datastore.targets import TargetsReader
from fusion.pipeline import STATS_DIR, fuse_logits
from fusion.vocab import MappingStatistics
from teacher_server.backends.hf import HFBackend
from teacher_server.extract import ExtractSettings, extract
from teacher_server.render import TEMPLATE_DIR

K = 5
QUANT = 1.0 / 65535 + 1e-6  # targets store probabilities as floor(p * 65535) / 65535
# Teachers are cached for the session (make_teacher reuses a directory holding the same settings). The pivot
# is barely trained, the source for a few dozen steps: MinCE should prefer the source.
TEACHERS = {
    "pivot": dict(arch="mistral", tokenizer_kind="spm32k", template="inst", steps=1, batch_size=2),
    "source": dict(arch="qwen2", tokenizer_kind="bpe131k", template="chatml", steps=20, batch_size=4),
}


def teacher_cache() -> Path:
    """Where the tiny teachers are kept: the session's cache under pytest's tmp path (`conftest.cache_dir`)."""
    return cache_dir("fusion-teachers")


@pytest.fixture(scope="module")
def logits(tmp_path_factory) -> dict[str, str]:
    cache = teacher_cache()
    data = load_dataset(write_jsonl(chat_samples(8, seed=31), tmp_path_factory.mktemp("data") / "chat.jsonl"))
    store = str(tmp_path_factory.mktemp("store"))
    uris = {}
    for name, t in TEACHERS.items():
        template = (TEMPLATE_DIR / f"{t['template']}.jinja").read_text(encoding="utf-8")
        model_dir = make_teacher(
            cache / name,
            t["arch"],
            t["tokenizer_kind"],
            template,
            steps=t["steps"],
            seed=3,
            batch_size=t["batch_size"],
        )
        settings = ExtractSettings(k=K, chat_template="model", shard_rows=3)  # several shards, paired by id
        uris[name] = extract(
            HFBackend(model_dir, device="cpu"), data, store, name, settings, progress=False
        ).uri
    uris["store"] = store
    return uris


def _assert_distributions(t):
    assert t.topk_ids.shape == t.topk_probs.shape == (len(t.positions), K)
    assert (t.topk_probs >= 0).all() and (t.topk_probs.sum(axis=1) <= 1 + 1e-5).all()
    assert (t.topk_probs[t.topk_ids < 0] == 0).all()
    for row in t.topk_ids:
        v = row[row >= 0]
        assert v.size == np.unique(v).size
    # sorted by descending probability, padding last
    assert (np.diff(t.topk_probs, axis=1) <= QUANT).all()


def _dense(ids, probs, vocab):
    out = np.zeros((ids.shape[0], vocab + 1))
    np.add.at(out, (np.arange(ids.shape[0])[:, None], ids), probs)  # id -1 lands in the spare last column
    return out[:, :vocab]


def _ce64(gold_logprob, mask):
    """The papers' CE: mean negative log-likelihood of the gold tokens under the full distribution."""
    v = -np.asarray(gold_logprob, dtype=np.float64)[mask]
    return float(v.mean()) if v.size else 0.0


def test_pairwise_targets_are_pivot_shaped_distributions_and_mince_picks_the_lowest_ce(logits, tmp_path):
    out = str(tmp_path / "targets")
    report = fuse_logits(logits["pivot"], [logits["source"]], out, progress=False)
    pivot = LogitsReader(logits["pivot"])
    targets = TargetsReader(out)
    assert targets.manifest.complete and len(targets) == len(pivot) == report.samples == 8
    meta = targets.manifest.meta
    assert (meta.pivot, meta.sources) == (
        pivot.manifest.logits_id,
        [LogitsReader(logits["source"]).manifest.logits_id],
    )
    assert (meta.align, meta.vocab_map, meta.fusion, meta.k) == ("offsets", "ms", "mince", K)

    wins = {"pivot": 0, "source": 0}
    for t in targets.iter_samples():
        p = pivot.get(t.sample_id)
        np.testing.assert_array_equal(t.input_ids, p.input_ids)
        np.testing.assert_array_equal(t.loss_mask, p.loss_mask)
        np.testing.assert_array_equal(t.positions, p.positions)
        _assert_distributions(t)
        assert set(t.ce) == {"pivot", "source"}
        assert t.winner == min(t.ce, key=lambda n: (t.ce[n], n != "pivot"))  # argmin, the pivot on ties
        wins[t.winner] += 1
        mask = p.loss_mask[p.positions + 1]
        # the pivot's CE, recomputed in float64 from its stored gold log-probabilities
        assert t.ce["pivot"] == pytest.approx(_ce64(p.gold_logprob, mask), rel=1e-9)
        if t.winner == "pivot":
            np.testing.assert_array_equal(t.topk_ids, p.topk_ids)
            np.testing.assert_allclose(t.topk_probs, np.exp(p.topk_logprobs), atol=QUANT)
    assert wins["source"] >= 6, wins  # the trained source explains the answers better than a blank pivot
    (tr,) = report.targets
    assert dict(tr.winners) == {k: v for k, v in wins.items() if v}

    (src,) = report.sources
    assert src.samples == 8 and src.missing == src.unaligned == 0
    assert src.chars_aligned_share >= 0.999  # assistant turns, identical text under both templates
    assert sum(src.group_shares.values()) == pytest.approx(1.0)
    assert src.group_shares["1-1"] > 0.5
    assert 0.5 < src.mapped_share <= 1.0 and 0.5 < src.from_source_share <= 1.0
    assert src.statistics_pairs > 0 and src.statistics_bytes == 12 * src.statistics_pairs + 4 * 131072
    stats = MappingStatistics.load(Path(out) / STATS_DIR / f"{meta.sources[0]}.npz")
    assert stats.num_pairs == src.statistics_pairs and (stats.pivot_vocab, stats.source_vocab) == (
        32000,
        131072,
    )
    saved = json.loads((Path(out) / "fusion_report.json").read_text())
    assert saved["samples"] == 8 and saved["targets"][0]["winners"] == dict(tr.winners)
    text = "\n".join(report.lines())
    for needle in ("1-1", "source mass mapped", "chars aligned", "winners: pivot", "mapping statistics"):
        assert needle in text

    # resumable: a second run finds everything committed and writes nothing
    again = fuse_logits(logits["pivot"], [logits["source"]], out, progress=False)
    assert again.targets[0].written == 0 and again.targets[0].already_done == 8
    # its report still counts the whole dataset (read back from the targets' winner and ce columns), not
    # the samples this run fused: the saved report the dashboard shows is not emptied by a rerun
    assert again.targets[0].winners == tr.winners
    assert again.targets[0].mean_ce() == pytest.approx(tr.mean_ce(), rel=1e-12)
    resaved = json.loads((Path(out) / "fusion_report.json").read_text())
    assert resaved["targets"][0]["winners"] == saved["targets"][0]["winners"]
    assert resaved["targets"][0]["mean_ce"] == pytest.approx(saved["targets"][0]["mean_ce"], rel=1e-12)


def test_source_that_is_the_pivot_is_the_identity(logits, tmp_path):
    out = str(tmp_path / "identity")
    report = fuse_logits(logits["pivot"], [logits["pivot"]], out, fusion="avgce", progress=False)
    (src,) = report.sources
    assert src.groups["1-1"] == sum(src.groups.values()) > 0
    assert src.mapped_share == 1.0 and src.chars_aligned_share == 1.0
    pivot = LogitsReader(logits["pivot"])
    for t in TargetsReader(out).iter_samples():
        p = pivot.get(t.sample_id)
        assert t.ce["pivot"] == t.ce["pivot#2"]  # the same distributions, named apart
        # AvgCE of two equal distributions (weights 1/2 each) is that distribution (tied entries may swap)
        np.testing.assert_array_equal(
            _dense(t.topk_ids, t.topk_probs, 32000) > 0, _dense(p.topk_ids, 1, 32000) > 0
        )
        np.testing.assert_allclose(
            _dense(t.topk_ids, t.topk_probs, 32000),
            _dense(p.topk_ids, np.exp(p.topk_logprobs), 32000),
            atol=QUANT,
        )


def test_several_sources_pairwise_and_multi(logits, tmp_path):
    sources = [logits["source"], logits["pivot"]]
    ids = [LogitsReader(u).manifest.logits_id for u in sources]
    pair = fuse_logits(logits["pivot"], sources, str(tmp_path / "pair"), vocab_map="mined", progress=False)
    # one dataset per source at OUT/<targets id>: the id `store show` prints, as in a store's targets/
    assert [TargetsReader(t.uri).manifest.meta.sources for t in pair.targets] == [[i] for i in ids]
    assert [t.uri for t in pair.targets] == [str(tmp_path / "pair" / TargetsReader(t.uri).manifest.targets_id)
                                             for t in pair.targets]
    assert len({t.uri for t in pair.targets}) == 2
    # a run begun in the earlier layout (OUT/<source logits id>) is resumed where it is, not started anew
    older = tmp_path / "pair" / ids[0]
    Path(pair.targets[0].uri).rename(older)
    again = fuse_logits(logits["pivot"], sources, str(tmp_path / "pair"), vocab_map="mined", progress=False)
    assert [t.uri for t in again.targets] == [str(older), pair.targets[1].uri]
    assert [(t.written, t.already_done) for t in again.targets] == [(0, 8), (0, 8)]
    with pytest.raises(UserError, match="a dataset .* with several sources --out is the folder"):
        fuse_logits(logits["pivot"], sources, str(older), vocab_map="mined", progress=False)

    multi = fuse_logits(
        logits["pivot"], sources, str(tmp_path / "multi"), mode="multi", align="dtw", progress=False
    )
    (tr,) = multi.targets
    assert tr.candidates == ["pivot", "source", "pivot#2"]
    assert sum(tr.winners.values()) == 8
    for t in TargetsReader(tr.uri).iter_samples():
        _assert_distributions(t)
        assert set(t.ce) == {"pivot", "source", "pivot#2"}
        assert t.winner != "pivot#2"  # equal to the pivot's CE, and the pivot wins ties
    (dtw_source,) = [s for s in multi.sources if s.name == "source"]
    assert dtw_source.samples == 8 and dtw_source.chars_aligned_share >= 0.999


def _run(*args):
    return CliRunner().invoke(app, ["fuse", *args])


def test_cli_fuses_and_reports(logits, tmp_path):
    out = str(tmp_path / "cli")
    result = _run(
        "--pivot", logits["pivot"], "--source", logits["source"], "--out", out, "--quiet", "--k", "3"
    )
    assert result.exit_code == 0, result.output
    assert "winners:" in result.output and "chars aligned" in result.output
    t = next(TargetsReader(out).iter_samples())
    assert t.k == 3
    # one source with --out a store's targets/ folder (other targets already there): the dataset goes to
    # STORE/targets/<targets id>, the id `store show` prints, as with several sources
    store = tmp_path / "store"
    (store / "logits").mkdir(parents=True)
    (store / "targets" / "0123456789abcdef").mkdir(parents=True)
    result = _run("--pivot", logits["pivot"], "--source", logits["source"], "--out", str(store / "targets"),
                  "--quiet", "--k", "3")
    assert result.exit_code == 0, result.output
    (made,) = [p for p in (store / "targets").iterdir() if p.name != "0123456789abcdef"]
    assert TargetsReader(str(made)).manifest.targets_id == made.name and str(made) in result.output


def test_cli_bad_input_is_one_line_and_exit_2(logits, tmp_path):
    from datastore.fs import save_tokenizer
    from datastore.reader import LogitsReader
    from datastore.writer import LogitsWriter

    other = tmp_path / "other"  # the source's logits, recorded as scoring another input dataset
    src = LogitsReader(logits["source"])
    with LogitsWriter(str(other), src.manifest.meta.model_copy(update={"dataset_id": "0123456789abcdef"})) as w:
        for s in src.iter_samples():
            w.write(s)
    save_tokenizer(str(other), src.tokenizer())
    # the source's logits with 3 samples committed and its writer never closed (an extract still running)
    partial = tmp_path / "partial"
    w = LogitsWriter(str(partial), src.manifest.meta, shard_rows=3)
    for s in list(src.iter_samples())[:3]:
        w.write(s)
    save_tokenizer(str(partial), src.tokenizer())
    a_file = tmp_path / "a-file"
    a_file.write_text("kept\n")
    out = str(tmp_path / "out")
    base = ["--pivot", logits["pivot"], "--out", out]
    cases = [
        (
            ["--pivot", str(tmp_path / "nope"), "--source", logits["source"], "--out", out],
            "no logits dataset",
        ),
        ([*base, "--source", str(other)], "same dataset"),
        ([*base, "--source", logits["source"], "--align", "fuzzy"], "--align 'fuzzy'"),
        ([*base, "--source", logits["source"], "--vocab-map", "x"], "expected one of ms, mined, em"),
        ([*base, "--source", logits["source"], "--fusion", "best"], "expected one of mince, avgce"),
        ([*base, "--source", logits["source"], "--mode", "all"], "expected one of pairwise, multi"),
        ([*base, "--source", logits["source"], "--source", logits["source"]], "given twice"),
        (["--pivot", logits["pivot"], "--source", logits["source"], "--out", logits["pivot"]], "not targets"),
        ([*base, "--source", logits["source"], "--avgce-weights", "fusellm"], "only with --fusion avgce"),
        (["--pivot", logits["pivot"], "--source", logits["source"], "--out", str(a_file)], "a file is there"),
        (["--pivot", logits["pivot"], "--source", logits["source"], "--out", str(a_file / "t")],
         f"{a_file} is a file"),
        ([*base, "--source", str(partial)], "incomplete logits dataset (3 samples committed"),
        (["--pivot", str(partial), "--source", logits["source"], "--out", out], "--pivot"),
        # one source writes its dataset at --out itself: a folder of other datasets (a store's targets/,
        # where several sources put theirs) is refused, not filled with a dataset that breaks its listing
        (["--pivot", logits["pivot"], "--source", logits["source"], "--out", str(tmp_path)],
         "holds other things (a-file, other, partial)"),
    ]
    for args, needle in cases:
        result = _run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert not Path(out).exists()  # nothing written by a rejected run
    assert not (tmp_path / "_delta_log").exists() and not (tmp_path / "mapping_statistics").exists()
    assert a_file.read_text() == "kept\n"


def test_damaged_input_shard_fails_in_one_line_and_stores_nothing(logits, tmp_path):
    """A pivot whose shard was altered after its commit: the run stops naming the shard, and the targets
    dataset it had begun is gone (a fresh --out is removed, an empty existing one left empty), so a
    listing shows no empty dataset; a run over the intact pivot then fuses every sample."""
    import shutil

    damaged = tmp_path / "pivot-copy"
    shutil.copytree(logits["pivot"], damaged)
    shard = sorted(damaged.rglob("*.parquet"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "fresh", empty):
        result = _run("--pivot", str(damaged), "--source", logits["source"], "--out", str(out), "--quiet")
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and shard.name in lines[0] and "sha256" in lines[0], result.output
    assert not (tmp_path / "fresh").exists() and list(empty.iterdir()) == []
    result = _run("--pivot", logits["pivot"], "--source", logits["source"], "--out", str(empty), "--quiet")
    assert result.exit_code == 0, result.output
    assert len(TargetsReader(str(empty))) == len(LogitsReader(logits["pivot"]))

