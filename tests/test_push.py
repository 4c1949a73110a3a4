"""compress push: checks of what is pushed, the model card, the dry run, and pushes to a local stand-in for the Hub
(tests/fake_hub.py) that keep what arrived: one commit holding every file, nothing committed when an upload fails
midway, the token sent and never printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import compress
from compress.checkpoint import save
from compress.errors import CheckpointError, UsageError
from compress.eval.data import EvalText
from compress.eval.spec import EvalSpec
from compress.eval.tasks import Subject, evaluate_subjects
from compress.model import load_tokenizer
from compress.push import PushError, hub_id, plan_push, push
from compress_cli import cli
from conftest import REPO, TINY_TOKENIZER, make_tiny
from fake_hub import FakeHub

TOKEN = "hf_secretTOKEN0123456789"
RECIPE = {"model": {"path": "org/tiny-qwen2"}, "steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A w4 RTN checkpoint of a tiny Qwen2 whose recipe names a Hub model, with the tiny tokenizer."""
    model = compress.apply(make_tiny("qwen2"), RECIPE, device="cpu")
    folder = tmp_path_factory.mktemp("push") / "tiny-w4"
    save(model, folder, tokenizer=load_tokenizer(str(TINY_TOKENIZER)), recipe=RECIPE)
    return folder


@pytest.fixture
def ck(source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-w4"
    shutil.copytree(source, folder)
    return folder


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    yield server
    server.close()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_sends_every_file_in_one_commit(ck: Path, hub: FakeHub) -> None:
    url = push(plan_push(ck, "me/tiny-w4"), token=TOKEN)
    assert len(hub.state.commits) == 1
    commit = hub.state.commits[0]
    assert (commit.repo, commit.branch) == ("me/tiny-w4", "main") and url.startswith(f"{hub.url}/me/tiny-w4/commit/")
    assert commit.files == _files(ck)  # every file, byte for byte, the card included
    assert {"README.md", "config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= set(commit.files)
    assert len(hub.state.objects) >= 2  # the large files went through LFS uploads, the small ones inline
    assert hub.state.cards and hub.state.cards[0]["library_name"] == "compress"  # the card's metadata was validated
    assert hub.state.repos["me/tiny-w4"]["visibility"] != "private"
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for m, p, h in hub.state.requests if p.startswith("/api"))


def test_private_repository_and_branch(ck: Path, hub: FakeHub) -> None:
    push(plan_push(ck, "me/tiny-w4"), private=True, revision="w4", token=TOKEN)
    assert hub.state.repos["me/tiny-w4"] == {"visibility": "private", "branches": {"main", "w4"}}
    assert [c.branch for c in hub.state.commits] == ["w4"]
    push(plan_push(ck, "me/tiny-w4"), revision="w4", token=TOKEN)  # the repository and the branch exist: reused
    assert [c.branch for c in hub.state.commits] == ["w4", "w4"]


def test_an_upload_failing_midway_commits_nothing(ck: Path, hub: FakeHub) -> None:
    hub.state.fail_uploads_after = 1
    with pytest.raises(PushError, match="Nothing was committed: the repository is as it was") as err:
        push(plan_push(ck, "me/tiny-w4"), token=TOKEN)
    assert hub.state.uploads >= 2 and hub.state.commits == []
    assert "while uploading" in str(err.value) and TOKEN not in str(err.value)
    hub.state.fail_uploads_after = None  # the same command again completes
    push(plan_push(ck, "me/tiny-w4"), token=TOKEN)
    assert len(hub.state.commits) == 1 and hub.state.commits[0].files == _files(ck)


def test_a_refused_token_says_how_to_give_one(ck: Path, hub: FakeHub) -> None:
    hub.state.token = "hf_the_right_one"
    with pytest.raises(PushError, match="failed while creating the repository: .*401.*the token was refused or is "
                                        "missing: pass --token, set HF_TOKEN") as err:
        push(plan_push(ck, "me/tiny-w4"), token=TOKEN)
    assert TOKEN not in str(err.value) and hub.state.commits == [] and hub.state.repos == {}


def test_cli_push_and_dry_run(ck: Path, hub: FakeHub) -> None:
    runner = CliRunner()
    dry = runner.invoke(cli, ["push", str(ck), "me/tiny-w4", "--dry-run", "--token", TOKEN], obj={})
    assert dry.exit_code == 0, dry.output
    assert hub.state.requests == []  # nothing remote was touched
    assert (ck / "README.md").is_file() and "dry run: nothing was sent" in dry.output
    for name, data in _files(ck).items():
        assert f"{len(data):,} bytes" in dry.output and name in dry.output
    sent = runner.invoke(cli, ["push", str(ck), "me/tiny-w4", "--token", TOKEN], obj={})
    assert sent.exit_code == 0, sent.output
    assert "in one commit" in sent.output and TOKEN not in sent.output + dry.output
    assert len(hub.state.commits) == 1


def test_cli_push_failure_exits_1_without_the_token(ck: Path, hub: FakeHub) -> None:
    hub.state.fail_uploads_after = 0
    result = CliRunner().invoke(cli, ["push", str(ck), "me/tiny-w4", "--token", TOKEN], obj={})
    assert result.exit_code == 1 and "Nothing was committed" in result.output and TOKEN not in result.output
    assert hub.state.commits == []


def test_card_metadata_recipe_and_loading(ck: Path) -> None:
    plan_push(ck, "me/tiny-w4")
    text = (ck / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta == {"base_model": "org/tiny-qwen2", "library_name": "compress", "pipeline_tag": "text-generation",
                    "tags": ["compress", "rtn", "quantized"]}
    assert (ck / "recipe.yaml").read_text().rstrip() in text  # the recipe, verbatim
    assert "14 linear layers stored as int 4-bit, groups of 32; 0.7 MiB of weights" in text
    assert "- `rtn` (bits=4, clip_search=False, group_size=32, symmetric=True) on 14 layers" in text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-w4")' in text
    assert "## Evaluation" not in text  # no report in the folder


def test_card_is_kept_unless_asked_and_shows_a_report(ck: Path) -> None:
    (ck / "README.md").write_text("my own card\n")
    assert plan_push(ck, "me/tiny-w4").card == "kept" and (ck / "README.md").read_text() == "my own card\n"
    tok = load_tokenizer(str(TINY_TOKENIZER))
    spec = EvalSpec(tasks=["ppl", "memory"], seq_len=16, max_tokens=128)
    report = evaluate_subjects(Subject(compress.load(ck, device="cpu"), str(ck), "tiny-w4"), spec, tok,
                               Subject(make_tiny("qwen2"), "org/tiny-qwen2", "tiny-qwen2 (baseline)"),
                               EvalText((REPO / "README.md").read_text(), "README.md", ""), progress=False)
    (ck / "report.json").write_text(json.dumps(report, default=str))
    assert plan_push(ck, "me/tiny-w4", card=True).card == "rewritten"
    text = (ck / "README.md").read_text()
    assert "## Evaluation" in text and "### Quality" in text and "### Memory" in text
    assert f"{report['perplexity']:.4f}" in text and "README.md, 16-token windows" in text


def test_license_comes_from_the_base_models_card(ck: Path, tmp_path: Path) -> None:
    base = tmp_path / "models--org--base" / "snapshots" / "abc"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    config = json.loads((ck / "config.json").read_text())
    config["quantization_config"]["recipe"]["model"]["path"] = str(base)
    (ck / "config.json").write_text(json.dumps(config))
    plan_push(ck, "me/tiny-w4")
    meta = yaml.safe_load((ck / "README.md").read_text().split("---")[1])
    assert meta["base_model"] == "org/base" and meta["license"] == "apache-2.0"


def test_hub_ids() -> None:
    assert hub_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert hub_id("/cache/hub/models--Qwen--Qwen2-0.5B/snapshots/123") == "Qwen/Qwen2-0.5B"
    assert hub_id("/work/models/mine") is None


def _drop_tensor(ck: Path, name: str) -> None:
    tensors = load_file(ck / "model.safetensors")
    del tensors[name]
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})


def _declare_bits(ck: Path, bits: int) -> None:
    config = json.loads((ck / "config.json").read_text())
    config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["bits"] = bits
    (ck / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, error, message", [
    (lambda ck: _drop_tensor(ck, "model.layers.0.mlp.up_proj.scales"), CheckpointError,
     "weights do not match its config.json: model.layers.0.mlp.up_proj.scales is missing"),
    (lambda ck: _declare_bits(ck, 8), CheckpointError,
     "model.layers.0.mlp.up_proj.qweight is \\[.*\\], the config declares \\["),
    (lambda ck: (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:5000]),
     CheckpointError, "model.safetensors is damaged"),
    (lambda ck: (ck / "model.safetensors").unlink(), CheckpointError, "has no weights"),
    (lambda ck: (ck / "config.json").unlink(), UsageError, "has no config.json"),
    (lambda ck: (ck.parent / f".{ck.name}.partial-{os.getppid()}").mkdir(), UsageError,
     f"is being written now \\(by process {os.getppid()}\\)"),
], ids=["missing-tensor", "wrong-shape", "truncated", "no-weights", "no-config", "being-written"])
def test_what_is_not_a_complete_checkpoint_is_refused(ck: Path, hub: FakeHub, damage, error, message) -> None:
    damage(ck)
    with pytest.raises(error, match=message):
        plan_push(ck, "me/tiny-w4")
    assert not (ck / "README.md").exists() and hub.state.requests == []


def test_a_plain_model_or_a_working_copy_is_refused(tmp_path: Path) -> None:
    make_tiny("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(UsageError, match="is not a compress checkpoint"):
        plan_push(tmp_path / "plain", "me/plain")
    (tmp_path / ".out.partial-123").mkdir()
    with pytest.raises(UsageError, match="a run's working copy"):
        plan_push(tmp_path / ".out.partial-123", "me/out")
    with pytest.raises(UsageError, match="is not a directory"):
        plan_push(tmp_path / "missing", "me/out")


def test_push_in_a_fresh_process_through_hf_endpoint(ck: Path, hub: FakeHub) -> None:
    """The command as a user runs it: HF_ENDPOINT and HF_TOKEN from the environment."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1"}
    result = subprocess.run([sys.executable, "-m", "compress_cli", "push", str(ck), "me/tiny-w4"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert len(hub.state.commits) == 1 and hub.state.commits[0].files == _files(ck)


def test_an_export_is_pushed_with_how_to_serve_it(ck: Path, hub: FakeHub, tmp_path: Path) -> None:
    from compress.export import export

    out = export(ck, "compressed-tensors", tmp_path / "tiny-w4-ct")
    push(plan_push(out, "me/tiny-w4-ct"), token=TOKEN)
    card = hub.state.commits[0].files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "compressed-tensors" in meta["tags"] and "rtn" in meta["tags"]
    assert "stored in the compressed-tensors layout (pack-quantized: 14 layers)" in card
    assert "vllm serve me/tiny-w4-ct" in card and "`compressed-tensors` package" in card
    assert hub.state.commits[0].files["recipe.yaml"] == (ck / "recipe.yaml").read_bytes()


def test_an_export_missing_a_layer_is_refused(ck: Path, tmp_path: Path) -> None:
    from compress.export import export

    out = export(ck, "gptq", tmp_path / "tiny-w4-gptq")
    tensors = load_file(out / "model.safetensors")
    for key in [k for k in tensors if k.startswith("model.layers.1.mlp.up_proj.")]:
        del tensors[key]
    tensors["model.layers.9.mlp.up_proj.qweight"] = torch.zeros(1, dtype=torch.int32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj has no tensors; model.layers.9.mlp.up_proj"
                                              ".qweight belongs to no module of the config's model"):
        plan_push(out, "me/x")
