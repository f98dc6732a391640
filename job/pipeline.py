"""The run, top to bottom: fetch → prepare → train → publish. Resume is the normal start.

Everything before `train` runs in this one process (no process group exists yet); the ranks only
load the prepared cache. status.json follows every phase; the exit code says why the run ended.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

from job import evaluate, objectives, outage, publish, storage
from job.errors import ConfigError, EvalGateError, Interrupted, NotFoundError, SftjobError, VerificationError
from job.spec import RunSpec
from job.specload import to_yaml
from job.status import Status, write_termination_log
from job.train import dsops, launch

log = logging.getLogger("sftjob")


#: library caches that default to $HOME: the ranks' Arrow copy of the prepared data (datasets), matplotlib's
#: font cache, Triton's compiled kernels (Liger on GPUs). Found by bench/soak.py: a run wrote them outside
#: the job's directories, a full second copy of the training data among them.
LIBRARY_CACHES = {"HF_DATASETS_CACHE": "hf-datasets", "MPLCONFIGDIR": "matplotlib", "TRITON_CACHE_DIR": "triton"}


def own_library_caches(spec) -> None:
    """Point the libraries' caches into the job's cache dir (unless the environment chose one): the ranks
    inherit them. A pod's disk is the job's cache volume; $HOME may be read-only or small."""
    for var, sub in LIBRARY_CACHES.items():
        if var == "HF_DATASETS_CACHE" and "HF_HOME" in os.environ:  # the chart's: on the cache volume already
            continue
        os.environ.setdefault(var, str(spec.cache_root() / sub))


def run(spec: RunSpec) -> int:
    storage.configure(spec.storage)
    own_library_caches(spec)
    spec.require("model.path", "output.uri")
    if not spec.data_sources():
        raise ConfigError("missing required setting 'data.path'", hint="pass --data URI or set data: in the run spec")
    objective = objectives.check(spec)  # settings of another objective, or ones this objective could never train
    evaluate.check(spec)  # an impossible eval section fails now, not after training
    launch.check_bitsandbytes(spec)  # QLoRA / 8-bit optimizers on a machine that cannot run them
    from job.train import lora

    lora.check(spec)  # LoRA variants that could not publish a correct adapter
    from job.train import parent

    parent.check(spec)
    dsops.check(spec)  # offload_optimizer where DeepSpeed's cpu_adam op cannot load
    started = time.time()
    output = spec.output.uri.rstrip("/")
    workdir = spec.cache_root() / "runs" / hashlib.sha256(output.encode()).hexdigest()[:16]
    workdir.mkdir(parents=True, exist_ok=True)
    published = publish.check_output(output, spec.output.overwrite)  # exit 73 before touching anything

    run_id = make_run_id(spec.name, output)
    node_rank = launch.node_rank(spec)
    # Replacing a finished run: every node starts fresh (it saw _SUCCESS); node 0 retires the old run.
    fresh = spec.output.overwrite and published
    if fresh and node_rank == 0:
        publish.retire(output)
        log.warning("output.overwrite: replacing the finished run at %s (its checkpoints are removed)", output)
    from job import identity

    if not fresh:  # a checkpoint of another spec: refused (64) before anything is fetched
        fresh = identity.check_before_fetch(spec, output, node_rank=node_rank)
    status = Status(workdir, output if node_rank == 0 else None)  # one writer of <output>/status.json
    signal.signal(signal.SIGTERM, _interrupt)  # before/after training; launch owns it while ranks run
    status.start(run_id=run_id, max_steps=spec.train.max_steps if spec.train.max_steps > 0 else None)
    try:
        status.phase("fetching", f"model {spec.model.path}")
        model_dir = fetch_model(spec)
        adapter = parent.fetch(spec, model_dir)  # sealed, verified and shaped for this base, or 64 now
        if adapter:
            status.update(event=("adapter", f"continuing adapter {adapter.info['uri']} (sha256 {adapter.info['sha256'][:12]}…)"))

        status.phase("preparing", "normalise, render, tokenize, mask, pack")
        from job.data import progress, shared
        sharing = shared.for_spec(spec, node_rank, shared.num_machines(spec), output)  # node 0 prepares once
        progress.set_sink(progress.to_status(status))
        try:
            prepared = objective.prepare(spec, Path(model_dir) if Path(model_dir).exists() else None, sharing)
        finally:
            progress.set_sink(None)
        if status.read().get("percent") is not None:  # the preparing percentage is not training's
            status.update(percent=None, push=False)
        log.info("prepared data %s (%s)", prepared.dir, "cache hit" if prepared.cache_hit else "new")

        kept = None
        if not fresh and shared.num_machines(spec) == 1:  # other nodes would wait for a rendezvous (PET_NNODES too)
            kept = outage.trained(workdir, spec.spec_hash(), launch.Outcome)
        if kept:
            log.warning("publishing the adapter the previous attempt trained (step %d) without training again",
                        kept.step)
            status.update(step=kept.step, event=("reuse", f"adapter trained to step {kept.step} by the previous "
                                                 "attempt is kept locally; publishing it without retraining"))
            outcome = kept
        else:
            outage.forget(workdir)
            run_identity = identity.of_run(spec, model_dir=model_dir, prepared=prepared,
                                           adapter_sha256=adapter.info["sha256"] if adapter else None)
            outcome = launch.train(spec, prepared, model_dir, workdir, status, started=started, fresh=fresh,
                                   adapter_path=str(adapter.path) if adapter else None, run_identity=run_identity)
        if outcome.node_rank != 0:
            return 0
        if outcome.stopped == "sigterm":
            raise Interrupted(_stopped_message(outcome, workdir))
        if outcome.stopped is None:
            outage.keep(workdir, spec.spec_hash(), outcome)

        status.phase("publishing", f"verify and upload to {output}")
        partial = outcome.stopped == "deadline" and not spec.resilience.train_to_deadline
        stage = _stage_outputs(spec, prepared, outcome, workdir, model_dir)
        evaluation = None
        if evaluate.wanted(spec, prepared) and not partial:
            status.update(event=("evaluating", "eval loss; base vs adapter on the same prompts"))
            evaluation = objective.evaluate(spec, prepared, model_dir, outcome.adapter_dir, workdir)
            for name in ("eval.json", "eval.md"):
                shutil.copy(workdir / name, stage / name)
            status.update(eval=evaluation.summary)
            if evaluation.failures:
                _reject(stage, output, evaluation)
        run_info = {
            "run_id": run_id, "spec_hash": spec.spec_hash(), "base_model": spec.model.path,
            "chat_template_sha256": prepared.template_sha256, "metrics": outcome.final_metrics,
            "attempt": status.read().get("attempt"), "resumed_from": outcome.resumed_from,
            "parent_adapter": adapter.info if adapter else None,
        }
        manifest = outage.bounded(
            f"publishing to {output}", lambda: publish.publish(stage, output, overwrite=spec.output.overwrite,
                                                               partial=partial, run_info=run_info),
            spec.resilience.store_wait_seconds, kept=str(workdir) if outcome.stopped is None else None)
        outage.forget(workdir)
        if partial:
            raise Interrupted(f"max_runtime reached at step {outcome.step}: partial adapter published "
                              f"(manifest partial: true, no _SUCCESS); rerun to resume")
        shared.cleanup(sharing)  # this run's node-to-node copy of the prepared data (never data.cache_uri)
        doc = status.phase("succeeded", f"published {len(manifest['files'])} files to {output}")
        write_termination_log(doc)
        _summary(outcome, output, time.time() - started, evaluation.summary if evaluation else None)
        return 0
    except SftjobError as e:
        outage.settle(workdir, e)
        status.fail(int(e.exit_code), e.kind, str(e))
        raise  # the CLI prints it and leaves at once if a store call still hangs (outage.leave_if_stuck)
    except BaseException as e:
        status.fail(1, "crash", f"{type(e).__name__}: {e}")
        raise


def _stopped_message(outcome, workdir: Path) -> str:
    """The SIGTERM line: was this step's checkpoint stored, and where the next attempt starts."""
    try:
        stopped = json.loads((workdir / "stopped.json").read_text())
    except (OSError, ValueError):
        stopped = {}
    head = f"stopped by SIGTERM at step {outcome.step}; "
    if outcome.mirrored:
        return head + f"checkpoint step-{outcome.step} saved; the next attempt resumes from it"
    resume = stopped.get("resume_step", outcome.resumed_from)
    why = stopped.get("mirror_error")
    return (head + f"the checkpoint of step {outcome.step} could not be stored in the output"
            + (f" ({why})" if why else "") + "; the next attempt resumes from "
            + (f"checkpoint step-{resume}" if resume is not None else "the start"))


def _interrupt(signum, frame):
    raise Interrupted("stopped by SIGTERM outside training; nothing half-published (rerun resumes)")


def fetch_model(spec: RunSpec) -> str:
    """A local directory for the base model (S3 prefixes cached per node), or a hub id as given."""
    uri = spec.model.path
    if storage.is_remote(uri):
        # the same node cache as every input: a tokenizer fetched by validate/plan is not downloaded again
        return str(storage.fetch(uri.rstrip("/") + "/", spec.cache_root() / "inputs"))
    p = Path(uri)
    if p.exists():
        if not (p / "config.json").is_file():
            raise NotFoundError(f"{uri} is not a model directory (no config.json)",
                                hint="point --model at a directory written by save_pretrained")
        return str(p)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", uri):
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(uri)
            return uri
        except Exception:  # noqa: BLE001
            pass
    raise NotFoundError(f"model not found: {uri}", hint="give a local directory, an s3:// prefix, or a cached hub id")


def _explained(e: VerificationError, spec: RunSpec, outcome) -> SftjobError:
    """An untrained adapter from a run so short that LR warm-up (which starts at 0) took every step: a
    setting to change (64, not retried: every retry would train the same single step), not a fault."""
    from job.train.export import UntrainedError

    steps = outcome.step or 0
    warmup = math.ceil(steps * spec.train.warmup_ratio)
    if isinstance(e, UntrainedError) and 0 < steps <= warmup:
        return ConfigError(f"{e.message}: the run made {steps} optimizer step(s) and warm-up (warmup_ratio "
                           f"{spec.train.warmup_ratio}: {warmup} step(s), from lr 0) took them all",
                           hint="train longer (more rows, num_train_epochs) or set warmup_ratio 0. "
                                "Nothing was published")
    return e


def _stage_outputs(spec: RunSpec, prepared, outcome, workdir: Path, model_dir: str) -> Path:
    """Collect everything that gets published into one directory (verified adapter first)."""
    from job.train.export import merge, verify_adapter, verify_full
    from job.train.plots import plot_loss

    adapter = Path(outcome.adapter_dir)
    verify = verify_full if spec.train.method == "full" else verify_adapter
    try:
        info = verify(adapter, model_dir, trust_remote_code=spec.model.trust_remote_code)
    except VerificationError as e:
        raise _explained(e, spec, outcome) from None
    log.info("%s verified: %s", "model" if spec.train.method == "full" else "adapter", info)
    stage = workdir / "publish"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(adapter, stage)
    (stage / "chat_template.jinja").write_text(prepared.chat_template)
    for name in ("data_report.json", "token_lengths.png"):
        if (prepared.dir / name).exists():
            shutil.copy(prepared.dir / name, stage / name)
    for name in ("metrics.jsonl",):  # eval.json/eval.md are added after evaluation (never a stale copy)
        if (workdir / name).exists():
            shutil.copy(workdir / name, stage / name)
    if (workdir / "metrics.jsonl").exists():
        plot_loss(workdir / "metrics.jsonl", stage / "loss.png")
    (stage / "run.yaml").write_text(to_yaml(spec))
    if (workdir / "launch").is_dir():
        shutil.copytree(workdir / "launch", stage / "launch")
    if (workdir / "tensorboard").is_dir():  # report_to tensorboard: the event files (job/train/trackers.py)
        shutil.copytree(workdir / "tensorboard", stage / "tensorboard")
    if spec.output.merged and spec.train.method != "full":
        merge(adapter, model_dir, stage / "merged", trust_remote_code=spec.model.trust_remote_code)
    return stage


def make_run_id(name: str | None, output: str, now: float | None = None) -> str:
    """spec.name, else the output's last part plus a timestamp (once: `demo-20261129-195229` has one)."""
    if name:
        return name
    slug = _slug(output)
    return slug if re.search(r"\d{8}-\d{6}$", slug) else f"{slug}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def _slug(uri: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-") or "run"


def _reject(stage: Path, output: str, evaluation) -> None:
    """A missed gate: keep everything for inspection under rejected/, publish nothing at the top level."""
    rejected = storage.join(output, "rejected")
    storage.upload_tree(stage, rejected)
    raise EvalGateError(f"adapter missed the evaluation gate: {'; '.join(evaluation.failures)}; "
                        f"kept under {rejected}/ (no _SUCCESS)",
                        hint="read eval.md there; train longer or on better data, or relax eval.min_json_valid / eval.max_loss / eval.min_reward_accuracy")


def _summary(outcome, output: str, seconds: float, evaluation: dict | None = None) -> None:
    m = outcome.final_metrics or {}
    line = {"event": "done", "steps": outcome.step, "final_loss": m.get("loss"),
            "tokens_per_second": m.get("tokens_per_second"), "adapter": output, "seconds": round(seconds, 1)}
    if evaluation:
        line["eval"] = evaluation
    from job import logsetup

    fields = {k: v for k, v in line.items() if k != "event"}
    text = (f"done: {outcome.step} steps, final loss {m.get('loss')}, {m.get('tokens_per_second')} tok/s, "
            f"published to {output} in {seconds:.0f}s" + (f"; eval {evaluation}" if evaluation else ""))
    logsetup.event("done", text, **fields)
