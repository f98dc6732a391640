"""The `sftjob` command: parse a RunSpec, call one library function per command. No stage logic here."""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import typing
from typing import Any

from job import logsetup, redact, specload
from job import spec as specmod
from job.errors import ExitCode, SftjobError

SPEC_COMMANDS = ("run", "prepare", "preview", "validate", "plan")
#: SFTJOB_* variables that are not RunSpec knobs but are read by the code (tools, tests, the chart)
OTHER_ENV = ("SFTJOB_DEBUG", "SFTJOB_PROGRESS", "SFTJOB_TERMINATION_LOG", "SFTJOB_BOTO_DEBUG", "SFTJOB_HELM",
             "SFTJOB_CHART", "SFTJOB_POLL_SECONDS", "SFTJOB_WEED", "SFTJOB_RANK_STORAGE", "SFTJOB_OBJECTIVE_MODULES",
             "SFTJOB_ENTRYPOINT_PID")
log = logging.getLogger("sftjob.cli")


def _field_kind(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if annotation is bool or bool in args:
        return "bool"
    if typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args):
        return "list"
    if typing.get_origin(annotation) is dict or any(typing.get_origin(a) is dict for a in args):
        return "dict"
    if annotation is str or (str in args and not any(a in (int, float) for a in args)):
        return "str"
    return "yaml"


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run spec YAML (Helm-style `run:` wrapper accepted)")
    g = p.add_argument_group("run spec (every RunSpec field; see `sftjob schema`)")
    for path, flag in specmod.FLAGS_BY_PATH.items():
        if flag == "cache-dir" and p.prog.endswith("demo"):
            continue
        f = specload.leaf_field(path)
        kind = _field_kind(f.annotation)
        help_ = (f.description or "").replace("%", "%%")
        if kind == "bool":
            g.add_argument(f"--{flag}", dest=path, nargs="?", const="true", metavar="BOOL", help=help_)
            g.add_argument(f"--no-{flag}", dest=path, action="store_const", const="false", help=argparse.SUPPRESS)
        else:
            g.add_argument(f"--{flag}", dest=path, metavar=kind.upper() if kind != "str" else "STR", help=help_)


def _parse_value(path: str, raw: str) -> Any:
    kind = _field_kind(specload.leaf_field(path).annotation)
    if kind == "str":
        return raw
    if kind == "list":
        if raw.strip().startswith("["):
            return specload.parse_env_value(raw)
        if path == "train.target_modules" and raw == "all-linear":
            return raw
        return [x.strip() for x in raw.split(",") if x.strip()]
    if kind == "bool":
        v = raw.strip().lower()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        return raw
    return specload.parse_env_value(raw)


def spec_from_args(args: argparse.Namespace):
    overrides = {path: _parse_value(path, getattr(args, path)) for path in specmod.FLAGS_BY_PATH
                 if getattr(args, path, None) is not None}
    env = specload.env_overrides()
    log.debug("settings: config file %s; from env %s; from flags %s", getattr(args, "config", None) or "none",
              ", ".join(sorted(env)) or "none", ", ".join(sorted(overrides)) or "none")
    spec = specload.build(getattr(args, "config", None), overrides)
    if spec.log_format != "auto" and "log_format" not in overrides:  # set in the YAML or SFTJOB_LOG_FORMAT
        logsetup.setup(os.environ.get("SFTJOB_DEBUG") == "1", spec.log_format)
    return spec


def warn_unknown_env(environ: dict[str, str] | None = None) -> list[str]:
    """A misspelt SFTJOB_* variable would be ignored silently: say so, with the closest known name."""
    environ = os.environ if environ is None else environ
    known = {"SFTJOB_" + f.replace("-", "_").upper() for f in specmod.ALL_FLAGS} | set(OTHER_ENV)
    out = []
    for key in sorted(k for k in environ if k.startswith("SFTJOB_") and k not in known):
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
        out.append(f"sftjob: warning: unknown environment variable {key} is ignored"
                   + (f" (did you mean {close[0]}?)" if close else " (see `sftjob schema --markdown` for every knob)"))
    for line in out:
        print(line, file=sys.stderr)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that suggests the closest flag for a typo (the spec loader does the same for keys), and
    takes any negative number as a value (``--learning-rate -1e-4``, not only ``-1``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str):
        if "unrecognized arguments" in message:
            known = [f"--{f}" for f in specmod.ALL_FLAGS] + ["--config", "--debug", "--json", "--limit"]
            for tok in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(tok.split("=")[0], known, n=1, cutoff=0.6) if tok.startswith("--") else []
                if close:
                    message += f" (did you mean {close[0]}?)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sftjob", description="Instruction tuning of chat models as a batch job.")
    p.add_argument("--debug", action="store_true",
                   help="debug logs (settings sources, storage endpoint, library warnings) and tracebacks on errors")
    from job import version

    p.add_argument("--version", action="version", version=f"sftjob {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "fetch → prepare → train → publish (resumes from the newest complete checkpoint)",
        "prepare": "normalise, render, tokenize, mask and pack the data into the cache; print where",
        "preview": "show rendered examples with trained spans marked ([[...]] or colour), or --json",
        "validate": "check every row; exit 65 listing FILE:LINE: field: problem",
        "plan": "dry run: processes, batch, steps, tokens, memory and time estimates",
    }
    for name in SPEC_COMMANDS:
        sp = sub.add_parser(name, help=helps[name], description=helps[name])
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        _add_spec_flags(sp)
        if name == "preview":
            sp.add_argument("--limit", type=int, default=3, help="examples to show")
            sp.add_argument("--json", action="store_true", help="one JSON object per example per line")
        if name == "plan":
            sp.add_argument("--tokens-per-second", type=_positive_number, default=None,
                            help="throughput per GPU for the time estimate")
            sp.add_argument("--json", action="store_true", help="print the plan as JSON")
            sp.add_argument("--model-config", default=None,
                            help="config.json giving the model's shapes (no weights needed)")
    sp = sub.add_parser("schema", help="print the JSON Schema of RunSpec")
    sp.add_argument("--helm", action="store_true", help="the chart's values.schema.json (RunSpec under `run:`)")
    sp.add_argument("--markdown", action="store_true", help="the knob table (docs/knobs.md)")
    sp.add_argument("--chart-readme", action="store_true", help="the chart's README with its values table")
    sp = sub.add_parser("tiny-model", help="write the built-in tiny model + tokenizer (offline)")
    sp.add_argument("dir")
    sp.add_argument("--seed", type=int, default=0)
    sp = sub.add_parser("demo", help="whole pipeline on CPU against a local S3 server")
    sp.add_argument("--out", default="demo-out", help="where the published prefix is downloaded")
    sp.add_argument("--max-steps", type=int, default=40)
    sp.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    from job import ops

    ops.add_commands(sub)
    return p


def _positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (a rate; -5 printed a negative time estimate)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "schema":
        from job import schema

        if args.markdown:
            print(schema.knobs_markdown(), end="")
        elif args.chart_readme:
            print(schema.chart_readme(), end="")
        else:
            print(json.dumps(schema.helm_values_schema() if args.helm else specload.json_schema(), indent=2))
        return 0
    if cmd == "tiny-model":
        from job import tiny

        print(tiny.write(args.dir, seed=args.seed))
        return 0
    if cmd == "demo":
        from job import demo

        return demo.main(out=args.out, max_steps=args.max_steps, workdir=args.workdir)
    if cmd in SPEC_COMMANDS:
        warn_unknown_env()
        spec = spec_from_args(args)
        specmod.usable_cache_root(spec)  # where inputs are fetched and data prepared: refuse a bad one now
        from job import storage

        storage.configure(spec.storage)  # every command reads inputs with the run's storage settings
        if log.isEnabledFor(logging.DEBUG) and (spec.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
                                                or os.environ.get("AWS_ENDPOINT_URL_S3")):
            from job.storage import s3

            log.debug("storage: endpoint %s, max_attempts %d", s3.safe_endpoint(), spec.storage.max_attempts)
        if cmd == "run":
            from job import pipeline

            return pipeline.run(spec)
        if cmd == "prepare":
            from job.data import commands

            return commands.prepare_command(spec)
        if cmd == "validate":
            from job import objectives
            from job.train import dsops

            dsops.check(spec)  # a knob whose DeepSpeed op cannot load is a config error, before any fetch
            return objectives.check(spec).validate(spec)  # a knob of another objective, as `run` refuses it
        if cmd == "preview":
            from job import objectives
            from job.errors import ConfigError

            if args.limit < 1:
                raise ConfigError(f"--limit {args.limit}: preview shows at least one example",
                                  hint="pass --limit 1 or more")
            return objectives.get(spec).preview(spec, limit=args.limit, as_json=args.json)
        if cmd == "plan":
            from job.train import plan

            return plan.plan_command(spec, tokens_per_second=args.tokens_per_second, as_json=args.json,
                                     model_config=args.model_config)
    from job import ops

    return ops.dispatch(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("SFTJOB_DEBUG") == "1"
    if debug:
        os.environ["SFTJOB_DEBUG"] = "1"  # training ranks are child processes
    fmt = next((a.split("=", 1)[1] for a in argv if a.startswith("--log-format=")), None) or next(
        (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--log-format"), None)
    logsetup.setup(debug, fmt)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage errors are exit 64, help is 0
        return ExitCode.CONFIG if e.code not in (0, None) else 0
    try:
        return int(_dispatch(args) or 0)
    except SftjobError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"sftjob: error: {redact.text(str(e))}", file=sys.stderr)
        from job import outage

        outage.leave_if_stuck(int(e.exit_code))  # a transfer hung on a frozen store must not hold the exit
        return int(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C by a person: not a preemption, so not 75
        print("sftjob: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
