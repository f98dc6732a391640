"""Storage benchmark: job.storage vs a plain boto3 upload_file/download_file loop, same server, same run.

Starts a local SeaweedFS (job/storage/devserver.py), then times (a) one big object (default 512 MiB) and
(b) many small files (default 500 x 64 KiB), upload and download, each side alternating, best of
--repeat. Prints one JSON document: MB/s, files/s and ours/boto3 ratios.
Targets (loopback, this machine): small files >= 1.5x, big object >= 1.0x.

    .venv/bin/python bench/s3.py [--big-mib 512] [--files 500] [--file-kib 64] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn) -> float:
    """Time fn(); a (setup, fn) pair runs setup untimed first (e.g. removing the last download)."""
    if isinstance(fn, tuple):
        fn[0]()
        fn = fn[1]
    os.sync()  # start each run without the last one's dirty pages being written back under it
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mib", type=int, default=512)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--file-kib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=None, help="storage.max_concurrency (default: the spec's)")
    ap.add_argument("--part-mib", type=int, default=None, help="storage.multipart_chunksize_mb (default: the spec's)")
    args = ap.parse_args(argv)
    os.environ.setdefault("SFTJOB_PROGRESS", "0")

    from job.storage.devserver import S3Server

    work = Path(tempfile.mkdtemp(prefix="sftjob-bench-"))
    server = S3Server(root=work / "server").start()
    os.environ.update(server.env)
    try:
        return _bench(server, work, args)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _bench(server, work: Path, args) -> dict:
    import boto3

    from job import storage
    from job.spec import StorageSpec

    knobs = {k: v for k, v in {"max_concurrency": args.concurrency,
                                "multipart_chunksize_mb": args.part_mib}.items() if v}
    storage.configure(StorageSpec(**knobs))

    bucket = server.bucket("bench")
    plain = boto3.client("s3")  # default settings, endpoint and keys from the same env as ours
    src = work / "src"
    (src / "small").mkdir(parents=True)
    big = src / "big.bin"
    with open(big, "wb") as f:
        for _ in range(args.big_mib):
            f.write(os.urandom(1024 * 1024))
    for i in range(args.files):
        (src / "small" / f"f{i:04d}.bin").write_bytes(os.urandom(args.file_kib * 1024))
    small_files = sorted((src / "small").iterdir())

    def fresh(name: str):
        def setup():
            shutil.rmtree(work / name, ignore_errors=True)
            (work / name).mkdir(parents=True)
        return setup

    runs = {
        "big_upload": {
            "ours": lambda: storage.upload_file(big, f"s3://{bucket}/ours/big.bin"),
            "boto3": lambda: plain.upload_file(str(big), bucket, "plain/big.bin"),
        },
        "big_download": {
            "ours": (fresh("dl-ours"),
                     lambda: storage.download_file(f"s3://{bucket}/ours/big.bin", work / "dl-ours" / "big.bin")),
            "boto3": (fresh("dl-plain"),
                      lambda: plain.download_file(bucket, "plain/big.bin", str(work / "dl-plain" / "big.bin"))),
        },
        "small_upload": {
            "ours": lambda: storage.upload_tree(src / "small", f"s3://{bucket}/ours/small/"),
            "boto3": lambda: [plain.upload_file(str(p), bucket, f"plain/small/{p.name}") for p in small_files],
        },
        "small_download": {
            "ours": (fresh("sdl-ours"), lambda: storage.download_tree(f"s3://{bucket}/ours/small/", work / "sdl-ours")),
            "boto3": (fresh("sdl-plain"),
                      lambda: _plain_download_tree(plain, bucket, "plain/small/", work / "sdl-plain")),
        },
    }
    best: dict = {k: {"ours": float("inf"), "boto3": float("inf")} for k in runs}
    for _ in range(args.repeat):
        for name, sides in runs.items():
            for side in ("boto3", "ours") if _ % 2 else ("ours", "boto3"):
                best[name][side] = min(best[name][side], _timed(sides[side]))

    mb = args.big_mib * 1024 * 1024 / 1e6
    out: dict = {"config": {"big_mib": args.big_mib, "files": args.files, "file_kib": args.file_kib,
                            "repeat": args.repeat, "cpus": os.cpu_count(),
                            "storage": storage.settings().model_dump()}}
    for name, t in best.items():
        if name.startswith("big"):
            out[name] = {"ours_MBps": round(mb / t["ours"], 1), "boto3_MBps": round(mb / t["boto3"], 1)}
        else:
            out[name] = {"ours_files_per_s": round(args.files / t["ours"], 1),
                         "boto3_files_per_s": round(args.files / t["boto3"], 1)}
        out[name]["ratio"] = round(t["boto3"] / t["ours"], 2)
        out[name]["seconds"] = {k: round(v, 3) for k, v in t.items()}
    print(json.dumps(out, indent=2))
    return out


def _plain_download_tree(client, bucket: str, prefix: str, dest: Path) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            client.download_file(bucket, o["Key"], str(dest / o["Key"][len(prefix):]))


if __name__ == "__main__":
    main()
