"""Local paths and hub names: what a `--model` / `--tokenizer` / `--data` value means, checked before any work
(a local path that does not exist is an error at once; hub lookups only for names that are not paths, never
in offline mode, one probe and no retries)."""

from __future__ import annotations

import os

from .errors import UserError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model")


def offline(kind: str = "model") -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE" if kind == "dataset" else "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in names)


def looks_like_path(value: str) -> bool:
    """A value that can only mean a local path (a hub id is `name` or `owner/name`)."""
    if value.startswith(("/", ".", "~")) or value.endswith(("/", os.sep)) or "\\" in value:
        return True
    parts = value.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def resolve_pretrained(value: str, flag: str, files: tuple[str, ...] = MODEL_FILES) -> str:
    """`value` if it is a local folder holding one of `files`, or a hub name that exists (or is cached);
    else a UserError at once: a missing local path never goes to the hub, offline mode never goes online,
    and an unreachable hub is one line, not a minute of retries."""
    if os.path.exists(value):
        if not os.path.isdir(value):
            raise UserError(f"{flag} {value}: expected a folder, got a file")
        if not any(os.path.isfile(os.path.join(value, f)) for f in files):
            raise UserError(f"{flag} {value}: no {' / '.join(files)} in this folder")
        return value
    if looks_like_path(value):
        raise UserError(f"{flag} {value}: no such folder")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(value, files[0]), str):  # a cached file path
        return value
    check_hub_name(value, flag, "model")
    return value


def check_hub_name(value: str, flag: str, kind: str) -> None:
    """`value` (not a local path) names an existing hub `kind` ("model" or "dataset"): one probe, no retries;
    offline mode is an error at once for models (whose cache was looked at before); for datasets, offline
    mode leaves the name to `datasets`' own cache."""
    if offline(kind):
        if kind == "dataset":
            return
        raise UserError(f"{flag} {value}: not a local path, not in the cache, and offline mode is on")
    import huggingface_hub

    try:
        exists = huggingface_hub.repo_exists(value, repo_type=kind)
    except Exception as exc:  # no network, proxy, ...
        raise UserError(f"{flag} {value}: not a local path, and the hub could not be reached "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}; HF_HUB_OFFLINE=1 uses the "
                        "local cache)") from None  # fmt: skip
    if not exists:
        raise UserError(f"{flag} {value}: no such local path or hub {kind}")
