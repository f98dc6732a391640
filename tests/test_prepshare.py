"""Prepared data through the store (job/data/shared.py) and preparation progress (job/data/progress.py).

data.cache_uri: a second run (fresh node cache) downloads the verified entry instead of preparing, keyed by
the data's ETag/size (nothing downloaded on a hit). Multi-node: a node other than 0 waits for node 0's
READY, downloads and verifies; node 0's failure or the timeout is the retryable 69. Real SeaweedFS.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from job import specload, storage
from job.data import progress, shared
from job.data.prepare import cache_key, fingerprints, prepare
from job.demo_data import conversations
from job.errors import DataError, ExitCode, UnavailableError, VerificationError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from job import tiny

    d = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(d)
    return d


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def make_spec(cache: Path, tok_dir, data: str, **kw):
    over = {"model.path": str(tok_dir), "cache_dir": str(cache), "data.num_proc": 1, "data.path": data,
            "data.max_length": 128}
    over.update(kw)
    return specload.build(overrides=over)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_second_run_with_cache_uri_downloads_instead_of_preparing(s3, tmp_path, tok_dir, caplog):
    bucket = s3.bucket("prepshare")
    c = s3.client()
    c.put_object(Bucket=bucket, Key="data/chats.jsonl", Body=jsonl(conversations(40, seed=1)))
    cache_uri = f"s3://{bucket}/sftjob-cache/"
    first = prepare(make_spec(tmp_path / "a", tok_dir, f"s3://{bucket}/data/", **{"data.cache_uri": cache_uri}))
    assert not first.cache_hit
    key = first.dir.name
    keys = s3.keys(bucket, f"sftjob-cache/{key}/")
    upload = json.loads(c.get_object(Bucket=bucket, Key=f"sftjob-cache/{key}/READY")["Body"].read())["id"]
    assert {f"sftjob-cache/{key}/{upload}/{n}" for n in ("manifest.json", "train.parquet", "meta.json")} <= set(keys)

    caplog.set_level(logging.INFO, logger="job.data.shared")
    second = prepare(make_spec(tmp_path / "b", tok_dir, f"s3://{bucket}/data/", **{"data.cache_uri": cache_uri}))
    assert second.cache_hit and second.dir == tmp_path / "b" / "prepared" / key
    assert f"prepared data from cache s3://{bucket}/sftjob-cache/{key}" in caplog.text
    assert sha(second.train_path) == sha(first.train_path)
    assert not (tmp_path / "b" / "inputs").exists()  # keyed by ETag/size: the data itself was never fetched

    # the data changes (new ETag) → a new key, prepared again, not served from the old entry
    c.put_object(Bucket=bucket, Key="data/chats.jsonl", Body=jsonl(conversations(41, seed=2)))
    third = prepare(make_spec(tmp_path / "c", tok_dir, f"s3://{bucket}/data/", **{"data.cache_uri": cache_uri}))
    assert not third.cache_hit and third.dir.name != key


def _published_entry(s3, tmp_path, tok_dir, name):
    bucket = s3.bucket("prepshare")
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(conversations(30, seed=5)))
    cache_uri = f"s3://{bucket}/{name}"
    p = prepare(make_spec(tmp_path / "a", tok_dir, str(data), **{"data.cache_uri": cache_uri}))
    return bucket, data, cache_uri, p.dir.name


def _reseal(c, bucket, prefix, upload, manifest: dict, write: bool = True) -> None:
    body = json.dumps(manifest).encode()
    if write:
        c.put_object(Bucket=bucket, Key=f"{prefix}/{upload}/manifest.json", Body=body)
    c.put_object(Bucket=bucket, Key=f"{prefix}/READY",
                 Body=json.dumps({"id": upload, "manifest_sha256": hashlib.sha256(body).hexdigest()}).encode())


def test_cache_entry_with_a_bad_sha256_or_an_unsafe_name_is_refused(s3, tmp_path, tok_dir):
    bucket, data, cache_uri, key = _published_entry(s3, tmp_path, tok_dir, "tampered")
    c = s3.client()
    ready = json.loads(c.get_object(Bucket=bucket, Key=f"tampered/{key}/READY")["Body"].read())
    prefix, upload = f"tampered/{key}", ready["id"]
    c.put_object(Bucket=bucket, Key=f"{prefix}/{upload}/train.parquet", Body=b"not the parquet that was published")
    spec = make_spec(tmp_path / "b", tok_dir, str(data), **{"data.cache_uri": cache_uri})
    with pytest.raises(VerificationError, match="train.parquet: sha256") as e:
        prepare(spec)
    assert e.value.exit_code == ExitCode.VERIFY
    assert not (tmp_path / "b" / "prepared" / key).exists()  # nothing half-downloaded looks complete

    manifest = json.loads(c.get_object(Bucket=bucket, Key=f"{prefix}/{upload}/manifest.json")["Body"].read())
    manifest["files"].append({"path": "../../outside", "size": 1, "sha256": "0" * 64})
    _reseal(c, bucket, prefix, upload, manifest)
    with pytest.raises(DataError, match="unsafe path '../../outside'"):
        prepare(spec)
    assert not (tmp_path / "outside").exists() and not (tmp_path / "b" / "prepared" / key).exists()

    _reseal(c, bucket, prefix, "../elsewhere", manifest, write=False)  # the id in READY is a name read back too
    with pytest.raises(DataError, match="unsafe path '../elsewhere'"):
        prepare(spec)

    _reseal(c, bucket, prefix, upload, manifest)
    c.put_object(Bucket=bucket, Key=f"{prefix}/{upload}/manifest.json", Body=b'{"files": []}')  # READY no longer matches
    with pytest.raises(VerificationError, match="does not match the sha256 in READY"):
        prepare(spec)


def test_two_publishers_of_one_key_never_mix_their_files(s3, tmp_path, tok_dir, monkeypatch):
    """A sweep: two runs finish preparing the same key at once; READY is create-if-absent, the loser's
    upload is removed, and the entry downloads and verifies (their data reports differ in timings)."""
    bucket, data, cache_uri, key = _published_entry(s3, tmp_path, tok_dir, "race")
    c = s3.client()
    first = json.loads(c.get_object(Bucket=bucket, Key=f"race/{key}/READY")["Body"].read())["id"]
    other = prepare(make_spec(tmp_path / "other", tok_dir, str(data)))  # prepared apart: another report
    monkeypatch.setattr(shared, "_ready", lambda prefix: None)  # it looked before the first one sealed
    shared.publish(other.dir, f"{cache_uri}/{key}")
    monkeypatch.undo()
    assert json.loads(c.get_object(Bucket=bucket, Key=f"race/{key}/READY")["Body"].read())["id"] == first
    assert {k.split("/")[2] for k in s3.keys(bucket, f"race/{key}/") if k.count("/") > 2} == {first}
    got = prepare(make_spec(tmp_path / "b", tok_dir, str(data), **{"data.cache_uri": cache_uri}))
    assert got.cache_hit and sha(got.train_path) == sha(tmp_path / "a" / "prepared" / key / "train.parquet")


def test_local_fingerprints_keep_the_old_key(tmp_path, tok_dir):
    """Local files are still keyed by their sha256 (an existing node cache stays valid)."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(conversations(5, seed=1)))
    assert fingerprints(str(data), tmp_path) == [sha(data)]
    spec = make_spec(tmp_path / "a", tok_dir, str(data))
    assert cache_key(spec, None, tok_dir, [(spec.data_sources()[0], [sha(data)])], []) == \
        prepare(spec).dir.name


def _node1(tmp_path, prefix: str, status_uri: str, timeout: float = 60) -> shared.Sharing:
    return shared.Sharing(cache_uri=None, node_prefix=prefix, node_rank=1, timeout=timeout, status_uri=status_uri)


def test_node1_waits_for_node0_then_downloads_the_same_shards(s3, tmp_path, tok_dir, caplog):
    bucket = s3.bucket("prepshare")
    out = f"s3://{bucket}/runs/wait-ok"
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(conversations(30, seed=7)))
    node0 = shared.for_spec(make_spec(tmp_path / "n0", tok_dir, str(data)), 0, 2, out)
    assert node0.publishes_to == f"{out}/.prepared"
    calls = []

    def node0_prepares_meanwhile(_seconds):  # node 1's first poll found nothing; node 0 now finishes
        calls.append(1)
        if len(calls) == 1:
            prepare(make_spec(tmp_path / "n0", tok_dir, str(data)), sharing=node0)

    caplog.set_level(logging.INFO, logger="job.data.shared")
    spec1 = make_spec(tmp_path / "n1", tok_dir, str(data))
    sharing1 = shared.for_spec(spec1, 1, 2, out)
    key = prepare(make_spec(tmp_path / "probe", tok_dir, str(data))).dir.name
    dest = tmp_path / "n1" / "prepared" / key
    shared.wait_for_node0(sharing1, key, dest, sleep=node0_prepares_meanwhile)
    assert "downloaded the prepared data from node 0" in caplog.text
    assert sha(dest / "train.parquet") == sha(tmp_path / "n0" / "prepared" / key / "train.parquet")
    assert not (tmp_path / "n1" / "inputs").exists()
    # node 0 removes the run's copy after publishing the adapter
    shared.cleanup(node0)
    assert not s3.keys(bucket, "runs/wait-ok/.prepared/")


def test_node1_exits_69_when_node0_fails(s3, tmp_path):
    bucket = s3.bucket("prepshare")
    out = f"s3://{bucket}/runs/wait-fail"
    status_uri = f"{out}/status.json"
    storage.write_bytes(status_uri, json.dumps({"state": "failed", "error": {"kind": "old"}}).encode())  # stale
    seen = []

    def node0_fails(_seconds):
        seen.append(1)
        if len(seen) == 1:  # a stale failed status (an earlier attempt) is not this attempt's failure
            storage.write_bytes(status_uri, json.dumps({"state": "preparing"}).encode())
        else:
            storage.write_bytes(status_uri, json.dumps(
                {"state": "failed", "error": {"kind": "data", "message": "3 bad row(s)"}}).encode())

    with pytest.raises(UnavailableError, match="node 0 failed before publishing .*3 bad row") as e:
        shared.wait_for_node0(_node1(tmp_path, f"{out}/.prepared", status_uri), "k" * 24, tmp_path / "dest",
                              sleep=node0_fails)
    assert e.value.exit_code == ExitCode.UNAVAILABLE == 69 and len(seen) == 2


def test_node1_exits_69_after_the_timeout(s3, tmp_path):
    bucket = s3.bucket("prepshare")
    out = f"s3://{bucket}/runs/wait-timeout"
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(UnavailableError, match="within data.prepare_timeout 10s") as e:
        shared.wait_for_node0(_node1(tmp_path, f"{out}/.prepared", f"{out}/status.json", timeout=10),
                              "k" * 24, tmp_path / "dest", clock=lambda: now[0], sleep=sleep)
    assert e.value.exit_code == 69 and now[0] >= 10


def test_progress_reports_rates_percent_and_eta_throttled(caplog):
    now = [0.0]
    sink = []
    progress.set_sink(sink.append)
    try:
        caplog.set_level(logging.INFO, logger="sftjob.prepare")
        p = progress.Progress(lambda: 1000, every=5, clock=lambda: now[0])
        for _ in range(9):  # 4.5 s: below the throttle, nothing reported
            now[0] += 0.5
            p.tick(rows=10, tokens=300)
        assert not sink and "preparing:" not in caplog.text
        now[0] += 0.5
        p.tick(rows=10, tokens=300)
        assert len(sink) == 1
        d = sink[0]
        assert (d["rows"], d["tokens"], d["percent"], d["rows_per_second"]) == (100, 3000, 10.0, 20.0)
        assert d["eta_seconds"] == 45  # 900 rows left at 20 rows/s
        assert "preparing: 100 rows (20 rows/s), 3000 tokens (600 tokens/s), 10.0% of 1000, ETA 45s" in caplog.text
    finally:
        progress.set_sink(None)


def test_estimate_rows_counts_jsonl_lines_and_parquet_rows_but_not_gzip(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b'{"x": 1}\n{"x": 2}\n{"x": 3}')  # no final newline
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), b)
    assert progress.estimate_rows([a, b]) == 5
    assert progress.estimate_rows([a, tmp_path / "c.jsonl.gz"]) is None


def test_prepare_reports_progress_to_the_status_sink(tmp_path, tok_dir, monkeypatch):
    from job.status import Status

    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(conversations(1200, seed=3)))
    monkeypatch.setattr(progress, "EVERY", 0.0)  # report on every chunk
    status = Status(tmp_path / "run", None)
    status.start(run_id="r")
    status.phase("preparing")
    to_status = progress.to_status(status)
    sink = []
    progress.set_sink(lambda d: (sink.append(d), to_status(d)))
    try:
        prepare(make_spec(tmp_path / "a", tok_dir, str(data)))
    finally:
        progress.set_sink(None)
    assert sink and sink[-1]["rows"] == 1200 and sink[-1]["percent"] == 100.0 and sink[-1]["tokens"] > 0
    assert [d["rows"] for d in sink] == sorted(d["rows"] for d in sink)
    doc = status.read()
    assert doc["state"] == "preparing" and doc["percent"] == 100.0 and doc["preparing"]["rows"] == 1200


def test_sftjob_prepare_cli_second_pod_says_prepared_data_from_cache(s3, tmp_path):
    """The acceptance, whole processes: a second `sftjob prepare --cache-uri` with an empty node cache."""
    import trainkit

    bucket = s3.bucket("prepshare")
    args = ("prepare", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
            "--max-length", "128", "--cache-uri", f"s3://{bucket}/cli-cache/")
    first = trainkit.run(*args, env={"SFTJOB_CACHE_DIR": str(tmp_path / "pod1")}, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prepared data from cache" not in first.stdout + first.stderr
    second = trainkit.run(*args, env={"SFTJOB_CACHE_DIR": str(tmp_path / "pod2")}, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"prepared data from cache s3://{bucket}/cli-cache/" in second.stdout + second.stderr
    (d1,), (d2,) = (list((tmp_path / p / "prepared").iterdir()) for p in ("pod1", "pod2"))
    assert d1.name == d2.name and sha(d1 / "train.parquet") == sha(d2 / "train.parquet")


def test_node1_alone_exits_69_with_a_clear_message_when_node0_never_publishes(s3, tmp_path):
    """Whole process: `sftjob run` as node 1 of 2 with no node 0 → the retryable 69 after prepare_timeout."""
    import trainkit

    bucket = s3.bucket("prepshare")
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", f"s3://{bucket}/runs/alone", "--max-length", "128", "--distributed", "ddp",
                     "--num-machines", "2", "--main-process-ip", "127.0.0.1", "--prepare-timeout", "3",
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "node1"), "JOB_COMPLETION_INDEX": "1"}, timeout=300)
    assert r.returncode == 69, r.stderr[-3000:]
    assert "node 0 did not publish the prepared data" in r.stderr and "data.prepare_timeout 3s" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "node1" / "prepared").exists() or not any((tmp_path / "node1" / "prepared").iterdir())


def test_an_unwritable_cache_uri_is_a_warning_for_a_single_node(tmp_path, tok_dir, caplog):
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl(conversations(10, seed=4)))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    caplog.set_level(logging.WARNING, logger="job.data.shared")
    p = prepare(make_spec(tmp_path / "a", tok_dir, str(data), **{"data.cache_uri": str(blocker / "cache")}))
    assert not p.cache_hit and (p.dir / "meta.json").exists()
    assert "could not read data.cache_uri" in caplog.text
    assert "could not store the prepared data in data.cache_uri" in caplog.text
    # node 0 of a multi-node run must publish (the others wait for it): there the failure is an error
    spec = make_spec(tmp_path / "b", tok_dir, str(data), **{"data.cache_uri": str(blocker / "cache")})
    with pytest.raises(UnavailableError, match="Not a directory"):
        prepare(spec, sharing=shared.for_spec(spec, 0, 2, str(tmp_path / "out")))
