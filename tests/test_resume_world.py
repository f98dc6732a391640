"""Resume on another world size (issue 15 item 3): SIGTERM a run of N processes → exit 75 → rerun with
M ≠ N processes resumes from that step, keeps the global batch, continues the loss curve, publishes.

Every run here has global batch 2 (1 process × micro-batch 2, or 2 × 1) and LoRA dropout 0, so an
uninterrupted single-process run is the reference for all of them: the same samples reach each step
whatever the split (measured: 1×2 vs 2×1 DDP agree to 5e-7 over 6 steps). What is left is float
summation order (gloo all-reduce vs accumulation): measured ≤ 1e-6 over the 25 steps after resume, for
every mode and direction. The tolerance, 1e-4, is 100× that and far below what a broken resume produces:
a skipped or repeated batch changes a step's loss by ~0.1 here, and a resumed step run with the fresh
schedule's lr instead of the restored one (a bug this test caught) was off by 0.02-0.04 a step later.
"""
import json
import shutil

import pytest
import trainkit

from job.errors import ExitCode
from job.train import portable, reshard

STEPS = 30
COMMON = ["--logging-steps", "1", "--seed", "5", "--learning-rate", "1e-3", "--max-length", "256",
          "--lora-dropout", "0", "--lr-scheduler-type", "linear", "--max-steps", str(STEPS)]
MODES = {"auto": [], "ddp": ["--distributed", "ddp"], "zero2": ["--distributed", "deepspeed", "--zero-stage", "2"],
         "zero3": ["--distributed", "deepspeed", "--zero-stage", "3"], "fsdp": ["--distributed", "fsdp"]}
FULL = ["--method", "full"]  # every parameter trainable: portable/ holds the whole model and its moments


def _args(out, *extra):
    return ["run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()), "--output", str(out),
            *COMMON, *extra]


def _procs(n: int) -> list[str]:
    return ["--num-processes", str(n), "--per-device-train-batch-size", str(2 // n)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted: 1 process × micro-batch 2; one run per method (LoRA, full), made when first asked for."""
    runs = {}

    def get(method: str) -> dict[int, float]:
        if method not in runs:
            d = tmp_path_factory.mktemp(f"ref-{method}")
            r = trainkit.run(*_args(d / "out", "--per-device-train-batch-size", "2", "--method", method),
                             env={"SFTJOB_CACHE_DIR": str(d / "c")})
            assert r.returncode == 0, r.stderr[-3000:]
            runs[method] = trainkit.losses(r.stdout.splitlines())
        return runs[method]

    return get


def _interrupt(tmp_path, out, env, *flags) -> tuple[int, dict]:
    """Start, SIGTERM after step 4 → exit 75; (the step it stopped at, its losses).

    A checkpoint every step keeps the losses (saving changes no state) and stretches the 26 steps between
    step 4 and the end from ~2.6 s to ~6 s. A test process starved for longer than that on a loaded CI
    machine (seen once: 4 → 30) lets the run finish before the signal lands; that attempt proves nothing
    about resuming, so it is started again (at most twice more), never accepted."""
    for attempt in range(3):
        log = tmp_path / "first.log"  # the last attempt's
        fresh = {**env, "SFTJOB_CACHE_DIR": f"{env['SFTJOB_CACHE_DIR']}-{attempt}"} if attempt else env
        proc = trainkit.start(*_args(out, *flags, "--save-steps", "1"), env=fresh, log=log)
        # DeepSpeed may JIT-build its CPU comm op first; the ranks are frozen while the signal travels
        rc = trainkit.interrupt_at(log, proc, 4, timeout=600)
        step = json.loads((out / "status.json").read_text())["step"]
        if step < STEPS:
            break
        print(f"attempt {attempt + 1}: the run reached step {step} (exit {rc}) before the SIGTERM landed; again")
        shutil.rmtree(out)
    assert rc == ExitCode.INTERRUPTED, log.read_text()[-4000:]
    assert 4 <= step < STEPS
    assert (out / "checkpoints" / f"step-{step}" / "COMPLETE").exists()
    return step, trainkit.losses(log.read_text().splitlines())


def _strip_portable(out, step):
    """What a checkpoint from before this change looks like: per-rank state only, its marker rewritten."""
    ck = out / "checkpoints" / f"step-{step}"
    shutil.rmtree(ck / "portable")
    (ck / reshard.WORLD_FILE).unlink()
    marker = json.loads((ck / "COMPLETE").read_text())
    marker["files"] = [f for f in marker["files"] if not f["path"].startswith(("portable/", reshard.WORLD_FILE))]
    (ck / "COMPLETE").write_text(json.dumps(marker))


# Issue 15 asks for 2 → 1 and 1 → 2 under DDP, ZeRO-2 and ZeRO-3 (LoRA); FSDP and full fine-tunes once each
# (each case is ~1-2 min of CI): FSDP LoRA (DTensors), full under ZeRO-2 (the param-group relink) and FSDP.
# FSDP 1 → 2, ZeRO-2 full 1 → 2 and ZeRO-3 full 2 → 1 passed the same way when this was written
# (|Δloss| ≤ 1e-6) and are left out of CI for time.
# "auto" is the default: DeepSpeed on 2 processes, single on 1, so a default run re-admitted on another GPU
# count also changes strategy (ZeRO-2 shards ↔ one plain optimizer.pt), both ways through portable/.
CASES = [(mode, "lora", before, after) for mode in ("ddp", "zero2", "zero3") for before, after in ((2, 1), (1, 2))] + [
         ("auto", "lora", 2, 1), ("auto", "lora", 1, 2),
         ("fsdp", "lora", 2, 1),
         ("zero2", "full", 2, 1), ("fsdp", "full", 2, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode,method,before,after", CASES,
                         ids=[f"{m}{'-full' if f == 'full' else ''}-{b}to{a}" for m, f, b, a in CASES])
def test_sigterm_then_resume_with_another_process_count(tmp_path, reference, mode, method, before, after):
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    flags = [*MODES[mode], "--method", method]
    stopped, before_losses = _interrupt(tmp_path, out, env, *flags, *_procs(before))
    world = json.loads((out / "checkpoints" / f"step-{stopped}" / reshard.WORLD_FILE).read_text())
    assert world["num_processes"] == before and world["global_batch"] == 2
    if mode == "auto":
        assert world["strategy"] == ("deepspeed" if before > 1 else "single"), world
    assert (out / "checkpoints" / f"step-{stopped}" / reshard.PORTABLE_FILE).is_file()

    if mode == "fsdp" and method == "lora":  # the same checkpoint as written before portable/ existed: refused
        legacy = tmp_path / "legacy"
        shutil.copytree(out, legacy)
        _strip_portable(legacy, stopped)
        r = trainkit.run(*_args(legacy, *flags, *_procs(after)), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c3")})
        assert r.returncode == ExitCode.VERIFY, r.stderr[-3000:]
        assert f"was saved as fsdpx{before} and this run is fsdpx{after}" in r.stderr and "Traceback" not in r.stderr

    # the rerun is a pod on other capacity: an empty local disk (all from the output), the same flags as
    # the first run but the process count
    rerun = trainkit.run(*_args(out, *flags, "--num-processes", str(after),
                                "--per-device-train-batch-size", str(2 // before)),
                         env={"SFTJOB_CACHE_DIR": str(tmp_path / "c2")})
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["resumed_from"] == stopped
    assert (out / "_SUCCESS").exists()  # published after verification
    kept = [e["message"] for e in status["events"] if e["type"] == "world_size"]
    micro, accum = (1, 2) if after == 1 else (1, 1)
    assert kept and f"micro-batch {micro} × accumulation {accum} × {after} processes = global batch 2 (kept)" in kept[-1]
    assert "global batch 2 (kept)" in rerun.stderr
    # per-rank state comes from portable/; DDP's full optimizer.pt resumes natively on any count
    assert ("resumed weights and optimizer state" in rerun.stderr) == (mode != "ddp")
    resumed = trainkit.losses(rerun.stdout.splitlines())
    reference = reference(method)
    assert min(resumed) == stopped + 1 and max(resumed) == STEPS  # nothing repeated, nothing skipped
    worst = max(abs(loss - reference[s]) for s, loss in resumed.items())
    worst_before = max(abs(before_losses[s] - reference[s]) for s in range(1, stopped + 1))
    print(f"{mode} {method} {before}->{after} at step {stopped}: before |Δ| ≤ {worst_before:.1e}, "
          f"after |Δ| ≤ {worst:.1e}; losses step {stopped} {before_losses[stopped]:.5f} "
          f"→ {stopped + 1} {resumed[stopped + 1]:.5f} (ref {reference[stopped + 1]:.5f}), final {resumed[STEPS]:.5f}")
    for s, loss in resumed.items():
        assert loss == pytest.approx(reference[s], abs=1e-4), s


# Another strategy on the same count: the sharded layouts most unlike each other, both ways (a platform
# moving a run between its DeepSpeed and FSDP images, or a spec edited between attempts).
CROSS = [("zero3", "fsdp"), ("fsdp", "zero2")]


@pytest.mark.slow
@pytest.mark.parametrize("first,then", CROSS, ids=[f"{a}-to-{b}" for a, b in CROSS])
def test_sigterm_then_resume_under_another_strategy(tmp_path, reference, first, then):
    out = tmp_path / "out"
    stopped, _ = _interrupt(tmp_path, out, {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}, *MODES[first], *_procs(2))
    rerun = trainkit.run(*_args(out, *MODES[then], *_procs(2)), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c2")})
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["resumed_from"] == stopped and (out / "_SUCCESS").exists()
    assert "resumed weights and optimizer state" in rerun.stderr
    resumed, ref = trainkit.losses(rerun.stdout.splitlines()), reference("lora")
    assert min(resumed) == stopped + 1 and max(resumed) == STEPS
    worst = max(abs(loss - ref[s]) for s, loss in resumed.items())
    print(f"{first} -> {then} at step {stopped}: after |Δ| ≤ {worst:.1e}")
    for s, loss in resumed.items():
        assert loss == pytest.approx(ref[s], abs=1e-4), s


@pytest.mark.slow
def test_an_unusable_checkpoint_on_another_count_is_exit_70_not_a_crash(tmp_path):
    out = tmp_path / "out"
    env = {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}
    stopped, _ = _interrupt(tmp_path, out, env, *MODES["zero2"], *_procs(2))
    # the LoRA changed between attempts: refused before any fetch by the run identity (job/identity.py) ...
    r = trainkit.run(*_args(out, *MODES["zero2"], *_procs(1), "--lora-r", "8"),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "c1")})
    assert r.returncode == ExitCode.CONFIG and "train.lora_r (--lora-r): 16 → 8" in r.stderr, r.stderr[-3000:]
    # ... and a checkpoint with no identity record (an older job's): the ranks find out when they load the
    # portable state
    marker = out / "checkpoints" / f"step-{stopped}" / "COMPLETE"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "identity"}))
    r = trainkit.run(*_args(out, *MODES["zero2"], *_procs(1), "--lora-r", "8"),
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "c1")})
    assert r.returncode == ExitCode.VERIFY, r.stderr[-3000:]
    assert f"checkpoint checkpoint-{stopped}: its trainable tensors do not match this run's LoRA" in r.stderr
    assert not (out / "_SUCCESS").exists()
    # a ZeRO checkpoint from before portable/ existed: refused before any process starts
    _strip_portable(out, stopped)
    r = trainkit.run(*_args(out, *MODES["zero2"], *_procs(1)), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c2")})
    assert r.returncode == ExitCode.VERIFY, r.stderr[-3000:]
    assert f"checkpoint checkpoint-{stopped} was saved as zero2x2 and this run is zero2x1" in r.stderr
    assert "Traceback" not in r.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["error"]["exit_code"] == ExitCode.VERIFY


@pytest.mark.parametrize("g,micro,procs,want", [
    (4, 2, 2, (2, 1, True)),
    (4, 2, 1, (2, 2, True)),   # 2 → 1: accumulation doubles
    (2, 2, 2, (1, 1, True)),   # 1 → 2: the micro-batch shrinks, never grows
    (8, 4, 4, (2, 1, True)),
    (12, 4, 8, (2, 1, False)),  # 8 and 16 are both 4 off: the larger micro-batch wins
    (6, 2, 4, (2, 1, False)),  # 4 and 8 are both 2 off
    (16, 3, 2, (2, 4, True)),  # the largest micro ≤ 3 that divides 8
])
def test_choose_batch_keeps_the_global_batch_or_says_it_could_not(g, micro, procs, want):
    assert reshard.choose_batch(g, micro, procs) == want


def test_plan_resume_reads_the_checkpoint_layout(tmp_path):
    from job.spec import RunSpec
    from job.train.launch import Topology

    def topo(strategy, n):
        return Topology(strategy, n, n, 1, 0, "127.0.0.1", 1, "no", False)

    spec = RunSpec.model_validate({"train": {"per_device_train_batch_size": 2}, "distributed": {"zero_stage": 2}})
    assert reshard.plan_resume(None, spec, topo("deepspeed", 2)).record["global_batch"] == 4
    ck = tmp_path / "checkpoint-7"
    (ck / "global_step7").mkdir(parents=True)
    for r in range(2):
        (ck / "global_step7" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert reshard.plan_resume(ck, spec, topo("deepspeed", 2)).mode == "native"  # same layout
    zero1 = spec.model_copy(update={"distributed": spec.distributed.model_copy(update={"zero_stage": 1})})
    assert reshard.plan_resume(ck, zero1, topo("deepspeed", 2)).mode == "native"  # same count: as it always did
    with pytest.raises(reshard.CheckpointUnusableError, match="saved as zero2x2 and this run is zero2x1"):
        reshard.plan_resume(ck, spec, topo("deepspeed", 1))
    legacy_fsdp = tmp_path / "checkpoint-3"
    (legacy_fsdp / "pytorch_model_fsdp_0").mkdir(parents=True)
    assert reshard.plan_resume(legacy_fsdp, spec, topo("fsdp", 2)).mode == "native"  # as before this existed
    (legacy_fsdp / "optimizer.pt").write_bytes(b"x")  # FSDP writes one too, readable by its own count only
    for r in range(2):  # the Trainer's RNG file of each rank tells how many wrote it
        (legacy_fsdp / f"rng_state_{r}.pth").write_bytes(b"x")
    assert reshard.plan_resume(legacy_fsdp, spec, topo("fsdp", 2)).mode == "native"
    with pytest.raises(reshard.CheckpointUnusableError, match="saved as fsdpx2 and this run is fsdpx1.*before portable"):
        reshard.plan_resume(legacy_fsdp, spec, topo("fsdp", 1))
    assert reshard.plan_resume(legacy_fsdp, spec, topo("ddp", 1)).mode == "native"  # DDP's is full: any count
    # DeepSpeed reads only its own shards (HF's loader raised on a plain optimizer.pt: exit 71 at every retry)
    with pytest.raises(reshard.CheckpointUnusableError, match="saved as full and this run is zero2x2"):
        reshard.plan_resume(legacy_fsdp, spec, topo("deepspeed", 2))
    rec = reshard.plan_resume(None, spec, topo("deepspeed", 2)).record
    (ck / reshard.WORLD_FILE).write_text(json.dumps(rec))
    (ck / "portable").mkdir()
    (ck / reshard.PORTABLE_FILE).write_bytes(b"x")
    r = reshard.plan_resume(ck, spec, topo("ddp", 1))
    assert r.mode == "portable" and r.record["global_batch"] == 4
    assert (r.spec.train.per_device_train_batch_size, r.spec.train.gradient_accumulation_steps) == (2, 2)
    assert "world size 2 → 1" in r.message and "global batch 4 (kept)" in r.message
    r = reshard.plan_resume(ck, spec, topo("deepspeed", 3))  # 4 over 3 processes: 3 is the closest
    assert (r.spec.train.per_device_train_batch_size, r.spec.train.gradient_accumulation_steps) == (1, 1)
    assert "global batch 3 (the run's 4 cannot be kept exactly; closest chosen)" in r.message
    assert r.record["global_batch"] == 4  # the run's own, for the next resume
    assert reshard.plan_resume(ck, spec, topo("fsdp", 1)).mode == "portable"
    (ck / reshard.PORTABLE_FILE).unlink()  # a full fine-tune over resilience.portable_max_gb
    (ck / reshard.WORLD_FILE).write_text(json.dumps({**rec, "method": "full"}))
    with pytest.raises(reshard.CheckpointUnusableError, match="larger than resilience.portable_max_gb") as e:
        reshard.plan_resume(ck, spec, topo("fsdp", 1))
    assert "--portable-max-gb" in e.value.hint
    (ck / reshard.WORLD_FILE).write_text("{not json")
    with pytest.raises(reshard.CheckpointUnusableError, match="unreadable"):
        reshard.plan_resume(ck, spec, topo("ddp", 1))


@pytest.mark.slow
def test_a_full_fine_tune_over_portable_max_gb_resumes_only_on_its_own_count(tmp_path):
    """The portable copy of a full fine-tune is the model ×3: over the knob it is not written, and another
    process count is a clear exit 70 naming the knob, before any process starts."""
    out = tmp_path / "out"
    flags = [*MODES["zero2"], *FULL, "--portable-max-gb", "0"]
    stopped, _ = _interrupt(tmp_path, out, {"SFTJOB_CACHE_DIR": str(tmp_path / "c")}, *flags, *_procs(2))
    assert "checkpoints carry no portable/ copy" in (tmp_path / "first.log").read_text()
    ck = out / "checkpoints" / f"step-{stopped}"
    assert not (ck / "portable").exists()
    assert json.loads((ck / reshard.WORLD_FILE).read_text())["method"] == "full"
    r = trainkit.run(*_args(out, *flags, *_procs(1)), env={"SFTJOB_CACHE_DIR": str(tmp_path / "c2")})
    assert r.returncode == ExitCode.VERIFY, r.stderr[-3000:]
    assert (f"checkpoint checkpoint-{stopped} was saved as zero2x2 and this run is zero2x1: it has no "
            "world-size-independent form: portable/ was not written") in r.stderr
    assert "--portable-max-gb" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "_SUCCESS").exists()


@pytest.mark.parametrize("saved_groups,now_groups", [(1, 2), (2, 1), (2, 2)])
def test_a_schedule_resumes_at_its_step_whatever_the_parameter_grouping(saved_groups, now_groups):
    """DeepSpeed keeps 1 parameter group for LoRA, single/DDP/FSDP 2 (an empty no-decay group): a schedule saved
    under one must resume under the other at the same step and lr (torch's load_state_dict raised)."""
    import torch
    from transformers import get_scheduler

    def schedule(groups: int):
        opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": wd}
                                 for wd in (0.0, 0.01)[:groups]], lr=1e-3)
        return get_scheduler("linear", opt, num_warmup_steps=3, num_training_steps=30)

    before = schedule(saved_groups)
    for _ in range(7):
        before.optimizer.step()
        before.step()
    now = schedule(now_groups)
    portable.load_schedule(now, before.state_dict())
    want = before.get_last_lr()[0]
    assert now.last_epoch == 7 and now.get_last_lr() == pytest.approx([want] * now_groups)
    assert [g["lr"] for g in now.optimizer.param_groups] == pytest.approx([want] * now_groups)  # set now
    now.optimizer.step()
    now.step()
    before.optimizer.step()
    before.step()
    assert now.get_last_lr() == pytest.approx([before.get_last_lr()[0]] * now_groups)  # and it goes on alike


@pytest.mark.parametrize("world", [b"[]", b"not json", b'{"layout": 5}', b'{"layout": "ddpx2", "global_batch": "x"}',
                                   b'{"layout": "ddpx2", "num_processes": -2}', b'{"layout": "ddpx2", "method": []}'])
def test_a_world_file_of_another_shape_is_an_unusable_checkpoint_not_a_crash(tmp_path, world):
    """sftjob_world.json comes back from the store; a global_batch of "x" crashed the resume (ValueError, 71)."""
    from job.spec import RunSpec
    from job.train.launch import Topology

    ck = tmp_path / "checkpoint-5"
    ck.mkdir()
    (ck / reshard.WORLD_FILE).write_bytes(world)
    spec = RunSpec.model_validate({"train": {"per_device_train_batch_size": 2}})
    with pytest.raises(reshard.CheckpointUnusableError, match="sftjob_world.json is unreadable"):
        reshard.plan_resume(ck, spec, Topology("ddp", 2, 2, 1, 0, "127.0.0.1", 1, "no", False))
