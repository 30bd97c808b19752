"""An output folder holds one run.

`claim(output_dir, settings, resume=..., overwrite=...)` is called by every training driver before its first
step (on the main process):

- a lock (`.etkd.lock`, an `fcntl.flock` with the holder's pid and host inside) refuses a second live writer;
  it is held until the command ends (`held_by_command`: `etkd`'s CLI releases the locks a command claimed when
  it returns or fails, so the demo and `etkd tune`, which run many commands in one process, do not keep every
  run's folder locked and its file open), else for the life of the process; the kernel drops the lock when
  the holder dies, so a killed run never leaves a stale lock behind;
- a folder holding an earlier run (its `settings.json`) is refused unless `resume` (the settings must be the
  same; the error lists every difference) or `overwrite` (the earlier run's files are deleted first);
- a non-empty folder that is not an etkd run folder is refused (nothing is deleted that we did not write).

Then `settings.json` is written, so the folder is marked as this run's from the first step on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

from .errors import UserError

LOCK_NAME = ".etkd.lock"
SETTINGS_NAME = "settings.json"
# Settings that may differ when a run is resumed: they change what is shown or where it goes, never a result
# (output_dir too: a run folder copied or moved, as PBT copies a better trial's folder, resumes where it is).
RESUME_FREE = frozenset({"resume", "overwrite", "progress", "debug", "log_level", "stop_at_step", "config",
                         "command", "func", "save_every", "log_every", "keep_checkpoints", "eval_batch_size",
                         "output", "name", "teacher", "output_dir"})  # fmt: skip
# `etkd tune` (population-based training) resumes a run with new hyper-parameters on purpose
# (`finetune --new-hparams-on-resume`), from a copy of another trial's run; segments write results to other files.
PBT_FREE = frozenset(
    {"learning_rate", "weight_decay", "warmup_ratio", "per_device_batch_size", "output", "output_dir"}
)

_held: dict[str, Any] = {}  # realpath -> open lock file, kept open until its command ends (held_by_command)


@contextlib.contextmanager
def held_by_command() -> Iterator[None]:
    """The locks `claim` takes inside this block are released (and their files closed) when it ends, however
    it ends; locks held before it are left alone (a command run by another, as the demo runs finetune)."""
    before = set(_held)
    try:
        yield
    finally:
        for key in [k for k in _held if k not in before]:
            _held.pop(key).close()  # closing the only descriptor of the lock's open file drops the flock


def _lock(directory: str) -> None:
    import fcntl

    path = os.path.join(directory, LOCK_NAME)
    key = os.path.realpath(directory)
    if key in _held:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"--output-dir {directory}: another etkd run is writing there ({holder}); wait for it "
                        "or choose another folder") from None  # fmt: skip
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = f


def diff(old: dict[str, Any], new: dict[str, Any], free: frozenset[str] = frozenset()) -> list[str]:
    """`key: old -> new` for every setting that differs (run-neutral keys and `free` left out)."""
    keys = sorted((set(old) | set(new)) - RESUME_FREE - free)
    missing = object()
    out = []
    for k in keys:
        a, b = old.get(k, missing), new.get(k, missing)
        if a != b:
            out.append(
                f"{k}: {'(unset)' if a is missing else json.dumps(a)} -> {'(unset)' if b is missing else json.dumps(b)}"
            )
    return out


def claim(
    output_dir: str, settings: dict[str, Any], *, resume: bool = False, overwrite: bool = False
) -> None:
    """Make `output_dir` this run's (see the module docstring); writes its settings.json. `settings`: JSON-able
    values (`config.settings_of` gives them for a namespace)."""
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
    if resume and overwrite:
        raise UserError("--resume and --overwrite: give one of them")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output-dir {output_dir}: cannot create it ({exc.strerror})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output-dir {output_dir}: not writable")
    _lock(output_dir)
    settings_path = os.path.join(output_dir, SETTINGS_NAME)
    others = [n for n in os.listdir(output_dir) if n != LOCK_NAME]
    if os.path.isfile(settings_path):
        if overwrite:
            for n in others:
                p = os.path.join(output_dir, n)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        elif resume:
            with open(settings_path) as f:
                old = json.load(f)
            free = PBT_FREE if settings.get("new_hparams_on_resume") else frozenset()
            changes = diff(old, settings, free)
            if changes:
                raise UserError(
                    f"--resume: {output_dir} holds a run with other settings ("
                    + "; ".join(changes)
                    + "); resume with the same settings or use --overwrite"
                )
        else:
            raise UserError(f"--output-dir {output_dir}: holds an earlier run ({SETTINGS_NAME}); --resume "
                            "continues it, --overwrite replaces it")  # fmt: skip
    elif others:
        raise UserError(
            f"--output-dir {output_dir}: not empty and not an etkd run folder ({', '.join(sorted(others)[:5])}"
            f"{', ...' if len(others) > 5 else ''}); choose an empty or new folder"
        )
    tmp = settings_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    os.replace(tmp, settings_path)
