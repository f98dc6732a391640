"""A sealed checkpoint whose Trainer files do not load is skipped for the previous one (issue 26).

The COMPLETE marker's sha256 list proves a file is the one uploaded, not that it loads: each test here
tampers with one file of the newest checkpoint and reseals the marker over it (sha256 and size rewritten),
so only a content check can tell. Before, the ranks crashed on it (71) at every retry.
One real interrupted run (checkpoints every 2 steps, SIGTERM at ~5) is shared; each test works on a copy.
"""
import hashlib
import json
import shutil
import struct

import pytest
import trainkit

from job import checkpoints, ckptcontent
from job.errors import ExitCode

pytestmark = pytest.mark.slow
STEPS = 12


def _steps_of(out):
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())


def _reseal(step_dir):
    marker = json.loads((step_dir / "COMPLETE").read_text())
    for f in marker["files"]:
        p = step_dir / f["path"]
        f["size"], f["sha256"] = p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
    (step_dir / "COMPLETE").write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    d = tmp_path_factory.mktemp("content")
    out, log = d / "out", d / "first.log"
    args = trainkit.steady_args(out, STEPS, "--save-steps", "2")
    proc = trainkit.start(*args, env={"SFTJOB_CACHE_DIR": str(d / "c")}, log=log)
    assert trainkit.interrupt_at(log, proc, 5) == ExitCode.INTERRUPTED, log.read_text()[-3000:]
    assert len(_steps_of(out)) >= 2, _steps_of(out)
    return {"out": out, "args": args}


@pytest.fixture
def copy(stopped, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(stopped["out"], out)
    args = [str(out) if a == str(stopped["out"]) else a for a in stopped["args"]]
    return out, args, _steps_of(out)


def _tamper_state(step_dir):
    state = json.loads((step_dir / "trainer_state.json").read_text())
    state["global_step"] = "x"
    (step_dir / "trainer_state.json").write_text(json.dumps(state))


def test_a_tampered_trainer_state_falls_back_to_the_previous_checkpoint_and_the_run_publishes(copy, tmp_path):
    out, args, steps = copy
    newest, previous = steps[-1], steps[-2]
    _tamper_state(out / "checkpoints" / f"step-{newest}")
    _reseal(out / "checkpoints" / f"step-{newest}")
    r = trainkit.run(*args, env={"SFTJOB_CACHE_DIR": str(tmp_path / "new-pod")})
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-3000:]
    assert f"skipping checkpoint step-{newest}: trainer_state.json: global_step is 'x'" in logs
    assert f"resuming from complete checkpoint step-{previous}" in logs
    assert (out / "_SUCCESS").exists()
    published = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert published == list(range(1, STEPS + 1))


def test_no_usable_checkpoint_starts_over_with_a_warning(copy, tmp_path):
    out, args, steps = copy
    for s in steps:
        _tamper_state(out / "checkpoints" / f"step-{s}")
        _reseal(out / "checkpoints" / f"step-{s}")
    r = trainkit.run(*args, env={"SFTJOB_CACHE_DIR": str(tmp_path / "new-pod")})
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs[-3000:]
    assert "no usable checkpoint" in logs and "resuming from complete checkpoint" not in logs
    assert (out / "_SUCCESS").exists()


@pytest.mark.parametrize("damage", ["torn torch archive", "zeroed torch archive member", "safetensors header",
                                    "safetensors extent", "json"])
def test_each_kind_of_damaged_file_is_named_and_the_older_checkpoint_is_fetched(copy, tmp_path, damage):
    """The launcher's own resume step (find_and_fetch), without training."""
    out, _, steps = copy
    newest, previous = steps[-1], steps[-2]
    d = out / "checkpoints" / f"step-{newest}"
    torch_file = next(p for p in sorted(d.rglob("*")) if p.suffix in (".pt", ".pth", ".bin"))
    tensors = next(d.rglob("*.safetensors"))
    if damage == "torn torch archive":
        torch_file.write_bytes(torch_file.read_bytes()[: torch_file.stat().st_size // 2])
        expect = torch_file.relative_to(d).as_posix()
    elif damage == "zeroed torch archive member":  # same size, a stored member's bytes zeroed: the CRC tells
        body = bytearray(torch_file.read_bytes())
        mid = len(body) // 3
        body[mid:mid + 64] = bytes(64)
        torch_file.write_bytes(bytes(body))
        expect = torch_file.relative_to(d).as_posix()
    elif damage == "safetensors header":
        body = tensors.read_bytes()
        tensors.write_bytes(struct.pack("<Q", 1 << 40) + body[8:])
        expect = tensors.relative_to(d).as_posix()
    elif damage == "safetensors extent":
        tensors.write_bytes(tensors.read_bytes()[:-16])
        expect = tensors.relative_to(d).as_posix()
    else:
        (d / "trainer_state.json").write_text('{"global_step": ')
        expect = "trainer_state.json"
    _reseal(d)
    why = ckptcontent.problem(d, newest)
    assert why is not None and why.startswith(expect), why
    found = checkpoints.find_and_fetch(str(out), tmp_path / "local", check=ckptcontent.problem)
    assert found is not None and found.step == previous
    assert not (out / "checkpoints" / f"step-{newest}").exists()  # removed: it could never be resumed from
    assert ckptcontent.problem(found.path, previous) is None
