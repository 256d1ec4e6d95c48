"""Merges logitfuse does not implement, run by mergekit itself (the `mergekit` extra: mergekit 0.1.5).

`logitfuse merge` hands a config here when its `merge_method` is one of mergekit's that we do not implement
(`registry.MERGEKIT_METHODS`: slerp, nuslerp, model_stock, della, breadcrumbs, passthrough, ...) or when it
uses a mergekit-only feature (`slices`, `modules`, `tokenizer_source`, `tokenizer`, `chat_template`). The
config goes to mergekit unchanged, through its Python API (`mergekit.merge.run_merge`), writing into the
staging directory `merge.engine` renames into place. Without mergekit installed the error says which
extra to install.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from datastore.words import plural
from merge.config import MergeConfig
from merge.errors import MergeError

EXTRA = "pip install 'logitfuse[mergekit]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _why(config: MergeConfig) -> str:
    features = config.mergekit_features
    if features:
        return f"{', '.join(features)} (a mergekit feature)"
    return f"merge_method {config.merge_method} (a mergekit method)"


def _has_tokenizer(config: MergeConfig) -> bool:
    source = config.base_model or (config.models[0].model if config.models else None)
    if source is None or not Path(source).is_dir():
        return True  # a hub id or slices: let mergekit decide
    return any((Path(source) / f).is_file() for f in _TOKENIZER_FILES)


def run_with_mergekit(config: MergeConfig, out: Path, say: Callable[[str], None], *, max_shard_size: int) -> None:
    """Runs `config` with mergekit into `out` (an empty directory). Raises MergeError, one line: mergekit
    missing (naming the extra), a config mergekit rejects, or a merge mergekit cannot run."""
    why = _why(config)
    try:
        import mergekit
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise MergeError(f"{why} is implemented by mergekit, not by logitfuse: install it with {EXTRA}") from None
    try:
        cfg = MergeConfiguration.model_validate(config.to_mergekit())
    except Exception as e:  # pydantic ValidationError or mergekit's RuntimeError from its validators
        raise MergeError(f"mergekit rejects the config: {' '.join(str(e).split())}") from None
    version = getattr(mergekit, "__version__", None) or _version()
    say(f"{why}: running mergekit {version}")
    options = MergeOptions(out_shard_size=max_shard_size, copy_tokenizer=_has_tokenizer(config),
                           write_model_card=False, quiet=True)
    try:
        run_merge(cfg, str(out), options=options)
    except Exception as e:  # mergekit raises RuntimeError, ValueError, KeyError, OSError for bad inputs
        message = " ".join(str(e).split())
        hint = ""
        if config.source == "flags" and "Missing required parameter" in message:
            hint = (f"; flags set only weight and density: give {config.merge_method}'s parameters in a "
                    "mergekit YAML with --config (docs/merge.md)")
        raise MergeError(f"mergekit failed: {type(e).__name__}: {message}{hint}") from None
    say(f"mergekit wrote {plural(sum(1 for _ in Path(out).glob('*.safetensors')), 'shard')}")


def _version() -> str:
    from importlib.metadata import version

    return version("mergekit")
