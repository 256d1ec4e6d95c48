"""The datastore over S3: a real moto server on localhost (the session's, `conftest.moto_server`), reached
through pyarrow's S3 filesystem."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from datastore import LogitsReader, LogitsWriter, list_logits, logits_id, logits_uri
from datastore.cli import store_app

boto3 = pytest.importorskip("boto3")
from test_datastore import check, meta, sample  # noqa: E402  (same tests dir)


def test_s3_write_resume_read_verify(s3_store):
    uri = logits_uri(s3_store, logits_id(meta()))
    samples = [sample(i) for i in range(8)]

    w = LogitsWriter(uri, meta(), shard_rows=3)
    for s in samples[:5]:  # one shard committed, two samples only buffered
        w.write(s)
    del w  # crash

    w = LogitsWriter(uri, meta(), shard_rows=3)
    assert w.done_ids == {s.sample_id for s in samples[:3]}
    for s in samples:
        if s.sample_id not in w.done_ids:
            w.write(s)
    m = w.close()
    assert m.complete and m.num_samples == 8 and len(m.shards) == 3

    r = LogitsReader(uri)
    got = list(r.iter_samples())
    assert [s.sample_id for s in got] == [s.sample_id for s in samples]
    for a, b in zip(samples, got, strict=True):
        check(a, b)
    check(samples[5], r.get(samples[5].sample_id))
    assert r.scan().collect().height == 8
    assert [x.logits_id for x in list_logits(s3_store)] == [logits_id(meta())]

    runner = CliRunner()
    res = runner.invoke(store_app, ["verify", uri])
    assert res.exit_code == 0 and res.output.startswith("OK"), res.output
    res = runner.invoke(store_app, ["ls", s3_store])
    assert res.exit_code == 0 and logits_id(meta()) in res.output

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    name = r.manifest.shards[1].file
    bucket, prefix = s3_store.removeprefix("s3://").split("/", 1)
    client.delete_object(Bucket=bucket, Key=f"{prefix}/logits/{logits_id(meta())}/{name}")
    res = runner.invoke(store_app, ["verify", uri])
    assert res.exit_code == 1 and f"{name}: missing" in res.output


def test_a_remote_tokenizer_loads_without_leaving_a_copy(s3_store, spm_tokenizer, monkeypatch, tmp_path):
    """A tokenizer stored with a dataset on S3 loads through a temporary copy that is removed (it used to be
    cached for good in a fixed directory of the system temp dir)."""
    import tempfile

    from datastore.fs import load_tokenizer, save_tokenizer
    from datastore.tokenizers import tokenizer_fingerprint

    uri = f"{s3_store}/logits/with-tokenizer"
    save_tokenizer(uri, spm_tokenizer)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temp dir, watched
    tok = load_tokenizer(uri)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(spm_tokenizer)
    assert tok("the small fox").input_ids == spm_tokenizer("the small fox").input_ids
    assert list(tmp_path.iterdir()) == []
