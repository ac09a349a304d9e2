"""Pushing a run to the Hugging Face Hub (`--push-to-hub`, `sftune push`): checked before training, uploaded in one
commit with the real `huggingface_hub` client (against a local stand-in of the Hub's endpoints: `hub_server.py`),
checkpoints left out, and every failure a clear error that leaves the run where it is."""

from __future__ import annotations

import pytest
from conftest import QUICKSTART_DATA, run_cli, run_main
from hub_server import HubStandIn


def hub_env(hub: HubStandIn, tmp_path, token: str = "hf_test") -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}


def train_args(model_dir, out, *extra):
    return ("train", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "16",
            "--max-steps", "4", "--save-every", "2", "--precision", "fp32", "--report-to", "none",
            "--sample-prompts", "", "--output-dir", str(out), *extra)


@pytest.mark.slow
def test_a_run_is_pushed_whole_but_its_checkpoints(small_model_dir, tmp_path):
    """The model, tokenizer, config, metrics, report and a model card go up in one commit to a private repo, byte for
    byte; checkpoints and the lock stay local. `sftune push` uploads the same run again (public when asked)."""
    out = tmp_path / "run"
    with HubStandIn(tmp_path / "hub") as hub:
        done = run_cli(*train_args(small_model_dir, out, "--push-to-hub", "me/sst2-sft"), env=hub_env(hub, tmp_path))
        assert done.returncode == 0, done.stderr
        assert f"pushed to {hub.url}/me/sst2-sft" in done.stdout
        assert hub.repos["me/sst2-sft"]["visibility"] == "private" and len(hub.commits) == 1
        pushed = {p.relative_to(tmp_path / "hub" / "me" / "sst2-sft") for p in (tmp_path / "hub").rglob("*")
                  if p.is_file()}
        local = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
        assert (out / "checkpoints" / "step-4").is_dir() and (out / ".sftune.lock").is_file()
        assert pushed == {p for p in local if p.parts[0] != "checkpoints" and not p.name.startswith(".")}
        assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.jsonl", "report.html",
                "README.md"} <= {str(p) for p in pushed}
        assert all((tmp_path / "hub" / "me" / "sst2-sft" / p).read_bytes() == (out / p).read_bytes() for p in pushed)
        card = (out / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n") and "Validation loss" in card
        assert hub.cards == [card]

        again = run_cli("push", str(out), "me/again", "--public", env=hub_env(hub, tmp_path))
        assert again.returncode == 0, again.stderr
        assert hub.repos["me/again"]["visibility"] == "public"


@pytest.mark.slow
def test_a_refused_token_stops_the_run_before_it_starts(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    with HubStandIn(tmp_path / "hub", refuse_token=True) as hub:
        done = run_cli(*train_args(tiny_model_dir, out, "--push-to-hub", "me/x"), env=hub_env(hub, tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--push-to-hub me/x: the Hub did not accept the token" in done.stderr
    assert "log in again with `hf auth login`, or leave out --push-to-hub and upload the run later with " \
           "`sftune push RUN_DIR me/x`" in done.stderr
    assert not out.exists()


def test_a_failed_upload_leaves_the_run_and_says_how_to_retry(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "2"))
    assert code == 0, err
    files = sorted(p for p in out.rglob("*") if p.is_file())
    with HubStandIn(tmp_path / "hub", fail_commits=True) as hub:
        done = run_cli("push", str(out), "me/x", env=hub_env(hub, tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "sftune push me/x: the upload failed (" in done.stderr
    assert f"The run is saved in {out}; retry with `sftune push {out} me/x`" in done.stderr
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(files + [out / "README.md"])


@pytest.mark.slow
def test_push_mistakes_are_named_before_anything_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ("train", "--dataset", str(QUICKSTART_DATA), "--output-dir", str(out))
    code, _, err = run_main(capsys, *base, "--push-to-hub", "a/b/c")
    assert code == 2 and "--push-to-hub 'a/b/c' is not a Hub repo id: write name, user/name or org/name" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(capsys, *base, "--push-to-hub", "me/x")
    assert code == 2 and "--push-to-hub me/x: HF_HUB_OFFLINE is set, so nothing can be uploaded" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    done = run_cli(*base, "--push-to-hub", "me/x", env={"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")})
    assert done.returncode == 2 and "--push-to-hub me/x: no Hugging Face token; log in with `hf auth login`" in \
        done.stderr
    done = run_cli(*base, "--push-to-hub", "me/x", env={"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert done.returncode == 2 and "the Hugging Face Hub (http://127.0.0.1:9) cannot be reached" in done.stderr
    code, _, err = run_main(capsys, "push", str(tmp_path), "me/x")
    assert code == 2 and "is not the output directory of a finished sftune run" in err
    assert not out.exists()
