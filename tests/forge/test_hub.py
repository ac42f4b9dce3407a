"""forge.hub against a local Hub stand-in: what arrives, resuming, no-op pushes, errors, Modelfiles, card."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from forge.hub import (
    CardFacts,
    GGUFEntry,
    HubError,
    UploadFile,
    check_repo_id,
    listing,
    modelfile_for_repo,
    ollama_hub_files,
    parse_modelfile,
    push_files,
    render_model_card,
    upload_file,
)

REPO = "alice/tiny-GGUF"


def quiet(_: str) -> None:
    return None


def make_files(root: Path, big: int = 700_000) -> list[UploadFile]:
    """A big and a small binary file (LFS), a text file (regular) and a nested one."""
    contents = {
        "tiny-Q4_K_M.gguf": os.urandom(big),
        "tiny-Q8_0.gguf": os.urandom(3000),
        "README.md": b"---\nlicense: mit\n---\n# tiny\n",
        "adapter/adapter_config.json": b'{"r": 8}\n',
    }
    files = []
    for name, data in contents.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(upload_file(name, path))
    return files


def test_push_sends_every_file_with_its_digest_and_an_identical_push_is_a_noop(hub, tmp_path):
    files = make_files(tmp_path)
    result = push_files(files, REPO, private=True, log=quiet)

    arrived = hub.files(REPO)
    assert set(arrived) == {".gitattributes"} | {f.path for f in files}
    for f in files:
        assert (
            hashlib.sha256(arrived[f.path]).hexdigest()
            == f.sha256
            == hashlib.sha256(f.local.read_bytes()).hexdigest()
        )
    assert hub.lfs_paths(REPO) == {"tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"}
    assert (
        hub.count("PUT", r"/part/\d+$") > 1
    )  # the big file went up in parts, the Hub's path for large files
    assert hub.repos[REPO].private
    assert hub.commit_count(REPO) == 2  # the repo's first commit, then one commit with every file
    assert result.commit == hub.head(REPO)
    assert result.uploaded == sorted(f.path for f in files) and result.unchanged == []

    hub.requests.clear()
    again = push_files(files, REPO, log=quiet)
    assert again.uploaded == [] and again.unchanged == sorted(f.path for f in files)
    assert again.commit == result.commit == hub.head(REPO)
    assert hub.commit_count(REPO) == 2
    assert hub.count("POST", "/commit/") == 0 and hub.count("PUT", "/lfs/") == 0


def test_changed_file_is_the_only_one_sent(hub, tmp_path):
    files = make_files(tmp_path)
    push_files(files, REPO, log=quiet)
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# tiny, better\n")
    files = [upload_file(f.path, f.local) for f in files]
    hub.requests.clear()

    result = push_files(files, REPO, log=quiet)
    assert result.uploaded == ["README.md"]
    assert hub.files(REPO)["README.md"] == (tmp_path / "README.md").read_bytes()
    assert hub.count("PUT", "/lfs/") == 0 and hub.count("POST", r"\.git/info/lfs") == 0


def test_rerun_after_a_failed_upload_sends_only_what_is_missing(hub, tmp_path):
    files = make_files(tmp_path, big=5000)
    failing = next(f for f in files if f.path == "tiny-Q8_0.gguf")
    other = next(f for f in files if f.path == "tiny-Q4_K_M.gguf")
    hub.fail("PUT", f"/lfs/{failing.sha256}$", 400)

    with pytest.raises(HubError) as err:
        push_files(files, REPO, log=quiet)
    message = str(err.value)
    assert "400" in message and "uploading" in message and "run the push again" in message
    assert hub.token not in message
    assert hub.commit_count(REPO) == 1  # nothing committed
    assert other.sha256 in hub.objects and failing.sha256 not in hub.objects

    hub.requests.clear()
    push_files(files, REPO, log=quiet)
    assert hub.count("PUT", "/lfs/") == 1 and hub.count("PUT", f"/lfs/{failing.sha256}$") == 1
    assert {
        p: hashlib.sha256(b).hexdigest() for p, b in hub.files(REPO).items() if p != ".gitattributes"
    } == {f.path: f.sha256 for f in files}


def test_rerun_after_a_failed_commit_uploads_nothing_again(hub, tmp_path):
    files = make_files(tmp_path)
    hub.fail("POST", "/commit/main$", 500)
    with pytest.raises(HubError, match="500 while uploading and committing.*run the push again"):
        push_files(files, REPO, log=quiet)

    hub.requests.clear()
    result = push_files(files, REPO, log=quiet)
    assert hub.count("PUT", "/lfs/") == 0
    assert result.commit == hub.head(REPO) and hub.commit_count(REPO) == 2


def test_revision_is_a_branch_and_main_is_left_alone(hub, tmp_path):
    files = make_files(tmp_path, big=1000)
    result = push_files(files, REPO, revision="v1", log=quiet)
    assert result.revision == "v1" and result.commit == hub.head(REPO, "v1")
    assert set(hub.files(REPO, "v1")) == {".gitattributes"} | {f.path for f in files}
    assert set(hub.files(REPO, "main")) == {".gitattributes"}


def test_no_token_is_a_clear_error(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN .* or run `hf auth login`"):
        push_files(make_files(tmp_path, big=100), REPO, log=quiet)
    assert hub.requests == []


def test_rejected_and_read_only_tokens_are_clear_errors_without_the_token(hub, tmp_path, monkeypatch):
    files = make_files(tmp_path, big=100)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token_123")
    with pytest.raises(HubError, match="rejected the token \\(401") as err:
        push_files(files, REPO, log=quiet)
    assert "hf_not_a_valid_token_123" not in str(err.value)

    hub.tokens["hf_read_only_456"] = "read"
    monkeypatch.setenv("HF_TOKEN", "hf_read_only_456")
    with pytest.raises(HubError, match="403 Forbidden.*write access to the 'alice' namespace") as err:
        push_files(files, REPO, log=quiet)
    assert "hf_read_only_456" not in str(err.value)


def test_another_namespace_is_refused(hub, tmp_path):
    with pytest.raises(HubError, match="refused creating the repository for bob/x.*403.*'bob' namespace"):
        push_files(make_files(tmp_path, big=100), "bob/x", log=quiet)


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_abc_secret_789")
    with pytest.raises(HubError, match=f"cannot reach the Hub at http://127.0.0.1:{port}") as err:
        push_files(make_files(tmp_path, big=100), REPO, log=quiet)
    assert "hf_abc_secret_789" not in str(err.value)


def test_token_from_the_local_login(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text(hub.token)
    lines: list[str] = []
    result = push_files(make_files(tmp_path, big=100), REPO, log=lines.append)
    assert result.commit == hub.head(REPO)
    assert lines and not any(hub.token in line for line in lines)


def test_listing_needs_no_network(tmp_path):
    files = make_files(tmp_path, big=100)
    rows = listing(files)
    assert [r["path"] for r in rows] == sorted(f.path for f in files)
    for row in rows:
        data = (tmp_path / row["path"]).read_bytes()
        assert row["size"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("repo", "ok"),
    [
        ("alice/tiny-GGUF", True),
        ("org.name/model_1.5B", True),
        ("tiny-GGUF", False),
        ("a/b/c", False),
        ("alice/bad name", False),
        ("alice/x--y", False),
        (None, False),
    ],
)
def test_repo_id_is_checked(repo, ok):
    if ok:
        assert check_repo_id(repo) == repo
    else:
        with pytest.raises(HubError, match="push.repo"):
            check_repo_id(repo)


MODELFILE = '''# made by Forge
FROM /home/me/runs/default/quantize/model-q4_k_m.gguf
ADAPTER /home/me/runs/default/lora.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
FROM inside the template stays
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM "You are \\"helpful\\"."
PARAMETER stop "<|im_end|>"
PARAMETER stop <|im_start|>
PARAMETER temperature 0.2
PARAMETER num_ctx 4096
'''


def test_modelfile_points_at_the_uploaded_gguf_and_keeps_its_template():
    rewritten = modelfile_for_repo(MODELFILE, "tiny-Q4_K_M.gguf")
    names = [(i.name, i.value) for i in parse_modelfile(rewritten)]
    assert ("FROM", "./tiny-Q4_K_M.gguf") in names
    assert not any(n == "ADAPTER" for n, _ in names)
    template = dict(names)["TEMPLATE"]
    assert "FROM inside the template stays" in template
    assert parse_modelfile(MODELFILE)[2].value == template  # the template is untouched
    assert "/home/me" not in rewritten


def test_an_adapter_modelfile_points_at_both_uploaded_ggufs():
    rewritten = modelfile_for_repo(MODELFILE, "base-f16.gguf", adapter="adapter-f16.gguf")
    names = [(i.name, i.value) for i in parse_modelfile(rewritten)]
    assert names[:2] == [("FROM", "./base-f16.gguf"), ("ADAPTER", "./adapter-f16.gguf")]
    assert names[2:] == [(i.name, i.value) for i in parse_modelfile(MODELFILE)][2:] and "/home/me" not in rewritten
    merged = modelfile_for_repo(MODELFILE, "tiny-Q4_K_M.gguf")
    with pytest.raises(HubError, match=r"^q8_0.Modelfile: no ADAPTER line to point at ./adapter-f16.gguf$"):
        modelfile_for_repo(merged, "base-f16.gguf", "q8_0.Modelfile", adapter="adapter-f16.gguf")


def test_ollama_hub_files_come_from_the_modelfile():
    files = ollama_hub_files(MODELFILE)
    assert files["template"].startswith("{{- range .Messages }}") and files["template"].endswith(
        "assistant\n"
    )
    assert files["system"] == 'You are "helpful".'
    assert json.loads(files["params"]) == {
        "stop": ["<|im_end|>", "<|im_start|>"],
        "temperature": 0.2,
        "num_ctx": 4096,
    }


def test_bad_modelfile_names_the_file_and_line():
    with pytest.raises(HubError, match=r"q8_0.Modelfile:3: unterminated"):
        parse_modelfile('FROM x\n\nTEMPLATE """{{ .Prompt }}\n', "q8_0.Modelfile")


def card_facts(**changes) -> CardFacts:
    facts = CardFacts(
        repo="alice/tiny-GGUF",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        datasets=["alice/chats"],
        model_type="llama",
        method="lora",
        training=[("method", "lora"), ("steps", "20"), ("final eval loss", "1.234")],
        data=[("examples", "100 (90 train / 10 eval)")],
        ggufs=[
            GGUFEntry("tiny-Q4_K_M.gguf", "Q4_K_M", 5_000_000, 4.85),
            GGUFEntry("tiny-Q8_0.gguf", "Q8_0", 9_000_000),
        ],
        ollama_quant="Q4_K_M",
        modelfiles=["Q4_K_M.Modelfile", "Q8_0.Modelfile"],
        adapter="adapter",
        eval_passed=False,
        eval_failures=["q4_k_m perplexity +12% > 10%"],
        eval_report="| gguf | ppl |\n|---|---|\n| Q4_K_M | 9.9 |",
        private=False,
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_says_what_the_hub_reads():
    meta = front_matter(render_model_card(card_facts()))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "gguf"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["alice/chats"]
    assert {"gguf", "ollama"} <= set(meta["tags"]) and "lora" in meta["tags"]
    assert meta["quantized_by"] == "alice"

    bare = front_matter(render_model_card(card_facts(base_model=None, license=None, datasets=[], ggufs=[])))
    assert "base_model" not in bare and "license" not in bare and "datasets" not in bare
    assert bare["library_name"] == "peft"


def test_card_body_says_how_to_run_it_what_was_trained_and_the_eval():
    card = render_model_card(card_facts())
    assert "ollama run hf.co/alice/tiny-GGUF:Q4_K_M" in card
    assert "llama-cli -hf alice/tiny-GGUF:Q4_K_M" in card
    assert "ollama create tiny-gguf -f Q4_K_M.Modelfile" in card
    assert 'PeftModel.from_pretrained(base, "alice/tiny-GGUF", subfolder="adapter")' in card
    assert "| `tiny-Q4_K_M.gguf` | Q4_K_M | 4.8 MiB | 4.85 |" in card
    assert "| final eval loss | 1.234 |" in card and "| examples | 100 (90 train / 10 eval) |" in card
    assert "quality gate failed" in card and "- q4_k_m perplexity +12% > 10%" in card
    assert "| Q4_K_M | 9.9 |" in card
    assert "private" not in card.split("---\n", 2)[2]
    assert render_model_card(card_facts()) == card  # deterministic: an unchanged run re-pushes nothing

    private = render_model_card(card_facts(private=True))
    assert "Ollama SSH key" in private and "HF_TOKEN" in private
