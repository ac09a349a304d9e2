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
        raise SftuneError(f"{what} path not found: {name!r} (check {flag}){colon_hint(name, what)}")
    if hub_reachable():
        try:
            return load(local_files_only=False)
        except (OSError, ValueError) as e:
            raise SftuneError(
                f"could not load {what} {name!r} from the Hugging Face Hub: {remote_code_hint(e)}\n"
                f"Check the id, or pass {flag} PATH to a local copy.{colon_hint(name, what)}"
            ) from None
    try:
        return load(local_files_only=True)
    except Exception:  # any failure of a cache-only load means "not cached"
        why = "HF_HUB_OFFLINE is set" if offline_forced() else "the Hugging Face Hub cannot be reached"
        raise SftuneError(
            f"{what} {name!r} is not a local path, {why}, and it is not in the local cache.\n"
            f"Pass {flag} PATH to a local copy, or connect to the Hub.{colon_hint(name, what)}"
        ) from None


def colon_hint(name: str, what: str) -> str:
    """For `path:2` or `path:train` where `path` exists (a weight or a split written as some tools write them): how
    sftune takes them. '' otherwise."""
    base, _, suffix = name.rpartition(":")
    if what != "dataset" or not base or not suffix or not Path(base).expanduser().exists():
        return ""
    try:
        float(suffix)
    except ValueError:
        return f"\n{base!r} exists: its split is chosen with --split {suffix} (or `split` of a --datasets entry)"
    return (f"\n{base!r} exists: a dataset of --datasets is weighted by writing it as a mapping, "
            f"'{{dataset: {base}, weight: {suffix}}}'")


# --- pushing a run to the Hub (--push-to-hub, `sftune push`) ----------------------------

PUSH_IGNORE = ["checkpoints/**", ".*", ".*/**", "**/.*", "*.lock", "metrics.tmp"]  # what stays local: checkpoints,
# staging directories, the lock, a metrics file being rewritten


def check_push(repo_id: str, flag: str = "--push-to-hub") -> None:
    """Before training (on every rank, as the config is): the repo id is valid, a token is at hand and the Hub
    accepts it, so that a run of hours does not fail at its end for want of a login."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SftuneError(f"{flag} {repo_id!r} is not a Hub repo id: write name, user/name or org/name (letters, "
                          f"digits, '-', '_' and '.')") from None
    later = (f"or leave out {flag} and upload the run later with `sftune push RUN_DIR {repo_id}`"
             if flag.startswith("--") else "then run it again")
    if offline_forced():
        raise SftuneError(f"{flag} {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, {later}")
    token = get_token()
    if not token:
        raise SftuneError(f"{flag} {repo_id}: no Hugging Face token; log in with `hf auth login` (or set HF_TOKEN), "
                          f"{later}")
    if not hub_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise SftuneError(f"{flag} {repo_id}: the Hugging Face Hub ({endpoint}) cannot be reached; connect, {later}")
    try:
        HfApi().whoami(token=token)
    except Exception as e:  # (an expired or revoked token: HTTP 401)
        raise SftuneError(f"{flag} {repo_id}: the Hub did not accept the token ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); log in again with `hf auth login`, {later}") from None


def model_card(run_dir: Path) -> str:
    """A README.md for the Hub: what was trained from what, and the run's evaluations (from its config.yaml and
    metrics.jsonl)."""
    import yaml

    from sftune import __version__
    from sftune.run_report import read_run

    run = read_run(run_dir)
    config = yaml.safe_load(run["config"]) or {}
    base = config.get("model") if config.get("init", "pretrained") == "pretrained" else None
    data = [e["dataset"] for e in config.get("datasets") or []] or [config.get("dataset")]
    meta = {"library_name": "peft" if (run_dir / "adapter_config.json").is_file() else "transformers",
            "tags": ["sftune", "sft"], **({"base_model": base} if base and not looks_like_path(base) else {}),
            **({"datasets": [d for d in data if d and not looks_like_path(d)]} if any(
                d and not looks_like_path(d) for d in data) else {})}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {run_dir.resolve().name}", "",
             f"Supervised fine-tuning of `{config.get('model')}`{' (from random weights)' if not base else ''} on "
             f"{', '.join(f'`{d}`' for d in data)} with sftune {__version__}.", ""]
    if run["eval"]:
        first, last = run["eval"][0], run["eval"][-1]
        lines += [f"Validation loss {first['val_loss']:.4f} at step {first['step']:,}, {last['val_loss']:.4f} at "
                  f"step {last['step']:,}.", ""]
    files = [f"`{name}` ({what})" for name, what in (("config.yaml", "the training configuration"),
                                                     ("metrics.jsonl", "every logged step and evaluation"),
                                                     ("report.html", "curves, samples and the data summary"))
             if (run_dir / name).is_file()]
    return "\n".join(lines + ([f"Also here: {', '.join(files)}.", ""] if files else []))


def push_run(run_dir: Path, repo_id: str, private: bool, flag: str = "--push-to-hub") -> str:
    """Upload a run's model (or adapter), tokenizer, config and report to `repo_id`, created if needed (private by
    default), in one commit; checkpoints stay local. A README.md model card is written first unless the run has one.
    Returns the repo's URL. A failure is an error that says the run is safe where it is and how to retry."""
    from huggingface_hub import HfApi

    card = run_dir / "README.md"
    if not card.exists():
        card.write_text(model_card(run_dir), encoding="utf-8")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=run_dir, ignore_patterns=PUSH_IGNORE,
                          commit_message=f"sftune: {run_dir.resolve().name}")
    except Exception as e:
        raise SftuneError(f"{flag} {repo_id}: the upload failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                          f"The run is saved in {run_dir}; retry with `sftune push {run_dir} {repo_id}`") from None
    return str(url)
