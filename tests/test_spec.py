"""RunSpec: one definition; YAML < env < flags; unknown keys named with a suggestion."""
import pytest

from job import spec as specmod
from job import specload
from job.errors import ConfigError


def test_yaml_sections_and_flat_keys_load(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: ./m\ndata: s3://b/train.jsonl\noutput: s3://b/runs/x\n"
                 "learning_rate: 1.0e-4\ntrain: {lora_r: 8}\nsave_steps: 50\nchat_template: llama3\n")
    s = specload.build(f, environ={})
    assert s.model.path == "./m" and s.data.path == "s3://b/train.jsonl" and s.output.uri == "s3://b/runs/x"
    assert s.train.learning_rate == 1e-4 and s.train.lora_r == 8
    assert s.resilience.save_steps == 50 and s.model.chat_template == "llama3"


def test_env_overrides_yaml_and_flags_override_env(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("max_steps: 5\nlora_r: 4\n")
    s = specload.build(f, {"train.lora_r": 32}, environ={"SFTJOB_MAX_STEPS": "7", "SFTJOB_LORA_R": "16"})
    assert s.train.max_steps == 7
    assert s.train.lora_r == 32


def test_helm_values_file_run_section_is_accepted(tmp_path):
    f = tmp_path / "values.yaml"
    f.write_text("run:\n  model: ./m\n  max_steps: 3\n")
    assert specload.build(f, environ={}).train.max_steps == 3


@pytest.mark.parametrize("text,key,suggestion", [
    ("learnin_rate: 1\n", "learnin_rate", "learning_rate"),
    ("train: {lora_rr: 8}\n", "train.lora_rr", "lora_r"),
    ("data: {pakcing: true}\n", "data.pakcing", "packing"),
])
def test_unknown_key_is_named_with_the_closest_valid_one(tmp_path, text, key, suggestion):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        specload.build(f, environ={})
    assert f"'{key}'" in str(e.value) and f"'{suggestion}'" in str(e.value)


def test_wrong_type_names_the_field(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train: {max_steps: many}\n")
    with pytest.raises(ConfigError, match="train.max_steps"):
        specload.build(f, environ={})


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: ./m\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+"):
        specload.build(f, environ={})


def test_every_field_has_a_description_and_a_unique_flag():
    flags = list(specmod.FLAGS_BY_PATH.values())
    assert len(flags) == len(set(flags))
    for path, _ in specmod.leaf_paths():
        assert specload.leaf_field(path).description, path
    # names users already know, as flags in kebab-case
    for flag in ("learning-rate", "max-steps", "num-train-epochs", "per-device-train-batch-size",
                 "gradient-accumulation-steps", "max-length", "lora-r", "lora-alpha", "lora-dropout",
                 "target-modules", "chat-template", "system-prompt", "seed", "save-steps", "zero-stage",
                 "model", "data", "output", "distributed", "num-processes", "packing", "overwrite"):
        assert flag in flags, flag


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SFTJOB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert specmod.cache_root() == tmp_path / "xdg" / "sftjob"
    monkeypatch.setenv("SFTJOB_CACHE_DIR", str(tmp_path / "c"))
    assert specmod.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SFTJOB_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert specmod.cache_root() == tmp_path / "home" / ".cache" / "sftjob"


def test_spec_hash_changes_with_a_knob():
    a = specload.build(overrides={"train.lora_r": 8}, environ={})
    b = specload.build(overrides={"train.lora_r": 16}, environ={})
    assert a.spec_hash() != b.spec_hash()


def test_knob_table_is_generated_from_the_spec():
    """docs/knobs.md drifts the moment a field changes; `make schema` regenerates it."""
    from pathlib import Path

    from job.schema import knobs_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "knobs.md"
    assert doc.read_text() == knobs_markdown(), "docs/knobs.md is stale: run `make schema`"
    for flag in specmod.FLAGS_BY_PATH.values():
        assert f"`--{flag}`" in doc.read_text()


@pytest.mark.parametrize("key,typo,closest", [
    ("optim", "adamw_torc", "adamw_torch"), ("optim", "paged_adamw8bit", "paged_adamw_8bit"),
    ("lr_scheduler_type", "cosin", "cosine"), ("lr_scheduler_type", "constant_warmup", "constant_with_warmup"),
])
def test_optimizer_and_scheduler_typos_are_config_errors_with_the_closest_name(key, typo, closest):
    """transformers would reject them only inside the ranks, as a retryable exit 1."""
    with pytest.raises(ConfigError) as e:
        specload.build(overrides={f"train.{key}": typo}, environ={})
    assert f"train.{key}" in str(e.value) and f"did you mean '{closest}'" in str(e.value)
    assert e.value.exit_code == 64


def test_every_name_transformers_accepts_is_accepted():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for n in OptimizerNames:
        assert specload.build(overrides={"train.optim": n.value}, environ={}).train.optim == n.value
    for n in SchedulerType:
        assert specload.build(overrides={"train.lr_scheduler_type": n.value}, environ={}).train.lr_scheduler_type == n.value


@pytest.mark.parametrize("steps,ok", [(-1, True), (1, True), (500, True), (0, False), (-2, False), (-100, False)])
def test_max_steps_is_positive_or_minus_one(steps, ok):
    if ok:
        assert specload.build(overrides={"train.max_steps": steps}, environ={}).train.max_steps == steps
    else:
        with pytest.raises(ConfigError, match="train.max_steps.*-1 to train num_train_epochs"):
            specload.build(overrides={"train.max_steps": steps}, environ={})


def test_the_charts_own_values_file_is_a_valid_config():
    """`--config values.yaml`: the `run:` section is the spec, the chart's keys (image, nodes, ...) are ignored."""
    from pathlib import Path

    values = Path(__file__).resolve().parent.parent / "charts" / "sftjob" / "values.yaml"
    s = specload.build(values, environ={})
    assert s.resilience.grace_seconds == 120


def test_a_helm_values_file_with_pod_keys_beside_run_is_read_for_run(tmp_path):
    f = tmp_path / "my-run.yaml"
    f.write_text("nodes: 2\nimage: {tag: x}\nrun:\n  model: ./m\n  max_steps: 3\n")
    s = specload.build(f, environ={})
    assert s.train.max_steps == 3 and s.model.path == "./m"
    f.write_text("nodes: 2\nrun: 3\n")
    with pytest.raises(ConfigError, match="run:. must be a mapping"):
        specload.build(f, environ={})


@pytest.mark.parametrize("key,value", [("train.learning_rate", "nan"), ("train.learning_rate", "inf"),
                                       ("resilience.max_runtime", "inf"), ("train.warmup_ratio", "nan"),
                                       ("storage.read_timeout", "inf")])
def test_no_knob_takes_infinity_or_nan(key, value):
    """`--learning-rate inf` was accepted (NaN only where a bound happened to refuse it); every float knob is finite."""
    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
        specload.build(overrides={key: value}, environ={})


def test_a_source_weight_is_finite_and_at_most_1000_copies(tmp_path):
    f = tmp_path / "run.yaml"
    for w, ok in [("2.5", True), ("1000", True), ("1001", False), (".inf", False), ("1e308", False)]:
        f.write_text(f"data: {{sources: [{{path: a.jsonl, weight: {w}}}]}}\n")
        if ok:
            assert specload.build(f, environ={}).data.sources[0].weight == float(w)
        else:
            with pytest.raises(ConfigError, match="data.sources.0.weight"):
                specload.build(f, environ={})


@pytest.mark.parametrize("key,value,fix", [
    ("data.path", "gs://bucket/train.jsonl", "use s3://bucket/key"),
    ("model.path", "hf://org/model", "use s3://bucket/key"),
    ("output.uri", "S3://bucket/runs/a", "write it as s3://bucket/key (lower case"),
    ("data.cache_uri", "s3a://bucket/cache", "s3a/s3n are Hadoop's names"),
    ("model.chat_template", "https://user:pa55word@example.com/t.jinja", "use s3://bucket/key"),
])
def test_a_location_with_a_scheme_we_do_not_read_is_refused_naming_the_knob(key, value, fix):
    """gs://, S3:// or s3a:// were taken for local paths that do not exist ('data not found: gs://...')."""
    with pytest.raises(ConfigError) as e:
        specload.build(overrides={key: value}, environ={})
    msg = str(e.value)
    assert f"{key}: unsupported URI scheme '{value.split('://')[0]}://'" in msg and fix in msg
    assert "(top level)" not in msg and "pa55word" not in msg


def test_s3_file_and_local_locations_and_hub_ids_are_accepted(tmp_path):
    spec = specload.build(overrides={"data.sources": ["s3://b/train/", f"file://{tmp_path}/x.jsonl", "rel/dir"],
                                    "model.path": "Qwen/Qwen2.5-0.5B", "output.uri": "s3://b/runs/a/"}, environ={})
    assert [s.path for s in spec.data.sources][0] == "s3://b/train/"
    with pytest.raises(ConfigError, match=r"data.sources.1.path: unsupported URI scheme 'gs://'"):
        specload.build(overrides={"data.sources": ["s3://b/a/", "gs://b/c/"]}, environ={})


@pytest.mark.parametrize("key,value,problem", [
    ("output.uri", "s3://", "names no bucket"), ("data.path", "s3:///train.jsonl", "names no bucket"),
    ("output.uri", "/", "filesystem root"), ("output.uri", "//", "filesystem root"),
])
def test_an_output_with_no_bucket_or_the_filesystem_root_is_refused_before_training(key, value, problem):
    """`--output s3://` and `--output /` trained first and failed only when publishing."""
    with pytest.raises(ConfigError, match=f"{key}: .*{problem}"):
        specload.build(overrides={key: value}, environ={})


def test_an_invalid_value_names_the_flag_or_variable_it_came_from(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train: {warmup_ratio: 2}\n")
    with pytest.raises(ConfigError) as e:
        specload.build(f, {"train.max_steps": 0}, environ={"SFTJOB_LEARNING_RATE": "inf"})
    msg = str(e.value)
    assert msg.startswith(f"invalid run spec ({f}, environment, flags):")
    assert "train.learning_rate: Input should be a finite number (got 'inf') from SFTJOB_LEARNING_RATE" in msg
    assert "(got 0) from --max-steps" in msg
    assert "train.warmup_ratio: Input should be less than 1 (got 2)\n" in msg + "\n"  # the file's own: no origin
