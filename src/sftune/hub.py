"""Deciding quickly whether the Hugging Face Hub can be used.

Without a network the Hub client retries for 20-50 s before saying so. We
answer in at most a few seconds: `HF_HUB_OFFLINE` is honoured, otherwise one
TCP connect to the endpoint with a short timeout decides, and what is cached
locally is used when the Hub is out of reach.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from sftune.errors import SftuneError, remote_code_hint

T = TypeVar("T")

CONNECT_TIMEOUT_S = 3.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline_forced() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))


@functools.cache
def hub_reachable() -> bool:
    """True when the Hub endpoint accepts a TCP connection within CONNECT_TIMEOUT_S."""
    if offline_forced():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is `name` or `org/name`)."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".yaml")
    )


def from_hub_or_cache(name: str, what: str, flag: str, load: Callable[..., T]) -> T:
    """Call `load(local_files_only=...)` for Hub id `name`, failing fast and clearly offline.

    `what` names the thing ("model", "tokenizer", "dataset") and `flag` the
    option to point at local files instead.
    """
    if looks_like_path(name):
        raise SftuneError(f"{what} path not found: {name!r} (check {flag})")
    if hub_reachable():
        try:
            return load(local_files_only=False)
        except (OSError, ValueError) as e:
            raise SftuneError(
                f"could not load {what} {name!r} from the Hugging Face Hub: {remote_code_hint(e)}\n"
                f"Check the id, or pass {flag} PATH to a local copy."
            ) from None
    try:
        return load(local_files_only=True)
    except Exception:  # any failure of a cache-only load means "not cached"
        why = "HF_HUB_OFFLINE is set" if offline_forced() else "the Hugging Face Hub cannot be reached"
        raise SftuneError(
            f"{what} {name!r} is not a local path, {why}, and it is not in the local cache.\n"
            f"Pass {flag} PATH to a local copy, or connect to the Hub."
        ) from None
