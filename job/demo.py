"""`sftjob demo`: the whole pipeline on CPU against a real local S3 server (SeaweedFS), offline.

Spanish multi-turn chats + the built-in tiny model go into a bucket; `run` trains a LoRA adapter and
publishes it to S3; the published prefix is downloaded to demo-out/ and verified file by file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("sftjob.demo")
BUCKET = "sftjob-demo"


def main(out: str = "demo-out", max_steps: int = 40, workdir: str | None = None) -> int:
    from job import demo_data, pipeline, publish, storage, tiny
    from job.specload import build
    from job.storage import paths
    from job.storage.devserver import S3Server
    from job.train.export import verify_adapter

    t0 = time.time()
    scratch = Path(workdir or tempfile.mkdtemp(prefix="sftjob-demo-"))
    server = S3Server(root=scratch / "s3")
    saved_env = dict(os.environ)
    try:
        server.start()
        os.environ.update(server.env)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        server.bucket(BUCKET)
        log.info("S3 server (SeaweedFS) at %s, bucket %s", server.endpoint, BUCKET)

        data = demo_data.write_jsonl(scratch / "train.jsonl", n=200)
        model_dir = tiny.write(scratch / "tiny-model")
        base = f"s3://{BUCKET}"
        storage.upload_file(data, f"{base}/data/es-chat/train.jsonl")
        storage.upload_tree(model_dir, f"{base}/models/tiny/")
        output = f"{base}/runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"

        spec = build(overrides={
            "model.path": f"{base}/models/tiny/", "data.path": f"{base}/data/es-chat/train.jsonl",
            "output.uri": output, "train.max_steps": max_steps, "train.learning_rate": 2e-3,
            "train.per_device_train_batch_size": 8, "train.logging_steps": 5, "train.warmup_ratio": 0.0,
            "data.max_length": 256, "resilience.save_steps": max(max_steps // 2, 1),
            "cache_dir": str(scratch / "cache"),
        })
        rc = pipeline.run(spec)
        if rc:
            return rc

        dest = Path(out)
        shutil.rmtree(dest, ignore_errors=True)
        files = [u for u in storage.list_files(output) if "/checkpoints/" not in u]
        for uri in files:
            storage.download_file(uri, paths.local_child(dest, uri[len(output) + 1:], f"listing of {output}"))
        manifest = publish.verify_published(str(dest))
        assert (dest / "_SUCCESS").is_file(), "no _SUCCESS in the published prefix"
        info = verify_adapter(dest, str(model_dir))
        metrics = [json.loads(x) for x in (dest / "metrics.jsonl").read_text().splitlines() if x.strip()]
        last = metrics[-1] if metrics else {}
        print("\n".join([
            "",
            "sftjob demo: OK",
            f"  steps            {last.get('step')}   final loss {last.get('loss'):.4f}   "
            f"(first {metrics[0].get('loss'):.4f})" if metrics else "  no metrics",
            f"  tokens/s         {last.get('tokens_per_second')}",
            f"  adapter          {output}/adapter_model.safetensors ({info['lora_tensors']} LoRA tensors, verified)",
            f"  downloaded to    {dest.resolve()} ({len(manifest['files'])} files, sha256 match manifest.json)",
            f"  wall time        {time.time() - t0:.0f}s",
        ]))
        return 0
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
