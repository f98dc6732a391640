"""Packing changes how rows are laid out, never what is learned: one optimizer step over every row gives
the loss of the unpacked rows. That holds only while the training forward has no KV cache
(job.loader.USE_CACHE_IN_TRAINING): with one, transformers stops deriving the per-example mask from the
restarting position_ids and attention crosses examples. FlexAttention has no backward on CPU, so sdpa and
eager are checked here."""
import pytest
import trainkit

pytestmark = pytest.mark.slow

ROWS = 24


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # prepared once per layout, shared by both kernels


def first_step_loss(tmp_path, cache, attn: str, packing: bool) -> float:
    out = tmp_path / f"out-{attn}-{packing}"
    r = trainkit.run(
        "run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data(ROWS)),
        "--output", str(out), "--max-steps", "1", "--per-device-train-batch-size", str(ROWS),
        "--max-length", "512", "--attn-implementation", attn, "--packing", str(packing).lower(),
        "--lora-dropout", "0", "--warmup-ratio", "0", "--logging-steps", "1", "--learning-rate", "1e-3",
        env={"SFTJOB_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    losses = trainkit.losses(r.stdout.splitlines())
    assert list(losses) == [1], r.stdout[-2000:]
    return losses[1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_step_over_all_rows_has_the_same_loss_packed_and_unpacked(tmp_path, cache, attn):
    unpacked = first_step_loss(tmp_path, cache, attn, packing=False)
    packed = first_step_loss(tmp_path, cache, attn, packing=True)
    assert abs(packed - unpacked) <= 1e-5, (packed, unpacked)
