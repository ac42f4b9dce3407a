"""Hugging Face Hub upload: token, repository, one commit of what changed, the model card, Ollama side files.

The token comes from `HF_TOKEN` or the local Hugging Face login (`hf auth login`) and is handed to
huggingface_hub only: it is never logged, never part of a message, never written to a file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forge.pipeline import PipelineError, sha256_file

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
RESUME_HINT = "run the push again to resume: what already reached the Hub is not sent again"


class HubError(PipelineError):
    """A push that cannot go on; the message says why and what to do (it never contains the token)."""


def check_repo_id(repo: str | None) -> str:
    """push.repo as a Hub repo id `namespace/name`, or a HubError saying what is wrong with it."""
    if not repo:
        raise HubError(
            "push.repo is not set: set it to the Hub repository, e.g. --set push.repo=you/name-GGUF"
        )
    if not REPO_ID.match(repo) or "--" in repo or ".." in repo or repo.endswith((".git", ".")):
        raise HubError(
            f"push.repo '{repo}': not a Hub repository id of the form namespace/name (e.g. you/name-GGUF)"
        )
    return repo


# --- what goes up --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadFile:
    """One file of the push: where it goes in the repository and where it is here."""

    path: str
    local: Path
    size: int
    sha256: str


def upload_file(path: str, local: Path, sha256: str | None = None) -> UploadFile:
    """An UploadFile; the sha256 is computed unless a trusted digest (an upstream manifest's) is given."""
    return UploadFile(path, local, local.stat().st_size, sha256 or sha256_file(local))


def listing(files: list[UploadFile]) -> list[dict[str, Any]]:
    """What would be uploaded, without the network: path in the repo, size and sha256 of each file."""
    return [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in sorted(files, key=lambda f: f.path)]


def human_size(size: float) -> str:
    """1023 B, 1.5 KiB, 390.8 MiB, 4.2 GiB."""
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _git_blob_sha1(path: Path) -> str:
    """The git object id of a file stored as a regular (non-LFS) blob: what the Hub's tree reports for it."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _same_on_hub(remote: Any, local: UploadFile) -> bool:
    """Whether a file of the Hub's tree has the local file's content (LFS: sha256; regular: git blob id)."""
    if remote is None or remote.size != local.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256
    return remote.blob_id == _git_blob_sha1(local.local)


# --- the push ------------------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo: str
    revision: str
    commit: str
    url: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def hub_endpoint() -> str:
    """The Hub's URL: HF_ENDPOINT as set now (huggingface_hub reads it once, at import), else the default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def resolve_token() -> str:
    """The token from HF_TOKEN or the local Hugging Face login; a HubError when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`"
        )
    return token


def push_files(
    files: list[UploadFile],
    repo: str,
    *,
    revision: str = "main",
    private: bool = True,
    message: str = "Upload with Forge",
    log: Callable[[str], None] = print,
) -> PushResult:
    """Create the repo (and branch) if needed and commit, in one commit, the files the Hub lacks.

    Files already on the branch with the same content are left out; when none is left, nothing is committed.
    Large files go through huggingface_hub's normal path (Xet when hf_xet is installed, else Git LFS), whose
    storage already holds any object a failed earlier push sent, so a rerun sends only what is missing.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.hf_api import RepoFile

    token = resolve_token()
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token, library_name="forge")
    with _hub_errors("checking the token", repo, endpoint, token):
        user = api.whoami()["name"]
    log(f"  hub: {endpoint} as {user}")
    with _hub_errors("creating the repository", repo, endpoint, token):
        api.create_repo(repo, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
    with _hub_errors("listing the repository's files", repo, endpoint, token):
        tree = api.list_repo_tree(repo, revision=revision, recursive=True)
        remote = {f.path: f for f in tree if isinstance(f, RepoFile)}
    changed = [f for f in files if not _same_on_hub(remote.get(f.path), f)]
    unchanged = sorted(f.path for f in files if f not in changed)
    url = f"{endpoint}/{repo}"
    if not changed:
        with _hub_errors("reading the branch head", repo, endpoint, token):
            head = api.repo_info(repo, revision=revision).sha
        log(f"  {repo}@{revision} already has all {len(files)} files: nothing to upload")
        return PushResult(repo, revision, head, url, [], unchanged)
    total = sum(f.size for f in changed)
    sending = f"{_count(len(changed), 'file')} ({human_size(total)})"
    log(f"  uploading {sending}, {len(unchanged)} on the Hub already")
    operations = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local)) for f in changed]
    with _hub_errors("uploading and committing", repo, endpoint, token, resumable=True):
        info = api.create_commit(repo, operations, commit_message=message, revision=revision)
    return PushResult(repo, revision, info.oid, url, sorted(f.path for f in changed), unchanged)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception and the ones it was raised from (huggingface_hub wraps upload failures)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _explain(exc: BaseException, what: str, repo: str, endpoint: str) -> str | None:
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_errors()
    for err in _causes(exc):
        response = getattr(err, "response", None)
        if isinstance(err, HfHubHTTPError) and response is not None:
            status = response.status_code
            if status == 401:
                return (
                    f"the Hub rejected the token (401 Unauthorized) while {what}: set HF_TOKEN to a valid "
                    "token or run `hf auth login`"
                )
            if status == 403:
                return (
                    f"the Hub refused {what} for {repo} (403 Forbidden): the token needs write access to the "
                    f"'{repo.split('/')[0]}' namespace"
                )
            if status == 404:
                return (
                    f"{repo} was not found on the Hub while {what} (404): check push.repo and push.revision"
                )
            detail = (err.server_message or str(err)).strip().splitlines()
            return f"the Hub answered {status} while {what}: {detail[0] if detail else 'no details'}"
        if isinstance(err, transport):
            return f"cannot reach the Hub at {endpoint} while {what} ({type(err).__name__}: {err})"
    if isinstance(exc, ValueError):
        # huggingface_hub's word on a malformed answer from the Hub or on README metadata it rejected
        return f"{what} failed: {' '.join(str(exc).split())}"
    return None


@contextmanager
def _hub_errors(what: str, repo: str, endpoint: str, token: str, resumable: bool = False) -> Iterator[None]:
    """Turn huggingface_hub and network failures into a one-line HubError, with the token scrubbed out."""
    try:
        yield
    except Exception as exc:
        message = _explain(exc, what, repo, endpoint)
        if message is None:
            raise
        if resumable:
            message = f"{message}; {RESUME_HINT}"
        raise HubError(message.replace(token, "<token>")) from None


# --- Ollama side files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Modelfile instruction: name (upper case), value (unquoted) and where it sits in the text."""

    name: str
    value: str
    start: int
    end: int


_WORD = re.compile(r"[A-Za-z_]+")


def parse_modelfile(text: str, source: str = "Modelfile") -> list[Instruction]:
    """The instructions of a Modelfile; values may be bare, "quoted" or \"\"\"multi-line\"\"\"."""
    found: list[Instruction] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] == "#":
            i = _line_end(text, i)
            continue
        word = _WORD.match(text, i)
        if word is None:
            raise HubError(f"{source}:{_line_no(text, i)}: expected a Modelfile instruction")
        name = word.group().upper()
        j = _skip_blanks(text, word.end())
        if name in ("PARAMETER", "MESSAGE"):
            key = _WORD.match(text, j)
            if key is None:
                raise HubError(f"{source}:{_line_no(text, j)}: {name} needs a name and a value")
            value, end = _read_value(text, _skip_blanks(text, key.end()), source)
            value = f"{key.group()} {value}"
        else:
            value, end = _read_value(text, j, source)
        found.append(Instruction(name, value, i, end))
        i = end
    return found


def _line_no(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _skip_blanks(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _read_value(text: str, i: int, source: str) -> tuple[str, int]:
    if text.startswith('"""', i):
        close = text.find('"""', i + 3)
        if close < 0:
            raise HubError(f'{source}:{_line_no(text, i)}: unterminated """ value')
        return text[i + 3 : close], _line_end(text, close + 3)
    end = _line_end(text, i)
    raw = text[i:end].strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            raw = json.loads(raw) if "\\" in raw else raw[1:-1]
        except ValueError:
            raise HubError(f"{source}:{_line_no(text, i)}: bad escape in the quoted value {raw}") from None
    return raw, end


def modelfile_for_repo(text: str, gguf: str, source: str = "Modelfile", adapter: str | None = None) -> str:
    """The Modelfile as it belongs next to the uploaded GGUFs: FROM ./<gguf>, and ADAPTER ./<adapter> when given
    (ollama.mode adapter), else no ADAPTER (the GGUF is merged)."""
    out, last, adapted = [], 0, False
    for ins in parse_modelfile(text, source):
        if ins.name == "FROM":
            out += [text[last : ins.start], f"FROM ./{gguf}"]
            last = ins.end
        elif ins.name == "ADAPTER" and adapter:
            out += [text[last : ins.start], f"ADAPTER ./{adapter}"]
            last, adapted = ins.end, True
        elif ins.name == "ADAPTER":
            out.append(text[last : ins.start])
            last = ins.end + 1 if text.startswith("\n", ins.end) else ins.end  # the line goes, newline too
    if adapter and not adapted:
        raise HubError(f"{source}: no ADAPTER line to point at ./{adapter}")
    out.append(text[last:])
    return "".join(out)


def ollama_hub_files(text: str, source: str = "Modelfile") -> dict[str, str]:
    """The files `ollama run hf.co/<repo>` reads from a repository: template, system and params (JSON)."""
    files: dict[str, str] = {}
    params: dict[str, Any] = {}
    for ins in parse_modelfile(text, source):
        if ins.name == "TEMPLATE":
            files["template"] = ins.value
        elif ins.name == "SYSTEM":
            files["system"] = ins.value
        elif ins.name == "PARAMETER":
            key, _, value = ins.value.partition(" ")
            if key.lower() == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[key.lower()] = _parameter_value(value)
    if params:
        files["params"] = json.dumps(params, indent=2, ensure_ascii=False) + "\n"
    return files


def _parameter_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


# --- the model card ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFEntry:
    path: str
    quant: str  # upper case, as Ollama's and llama.cpp's tags write it: Q4_K_M
    size: int
    bits_per_weight: float | None = None


@dataclass(frozen=True)
class AdapterFiles:
    """ollama.mode adapter's files in the repository: the LoRA GGUF, the base GGUF it applies to, the Modelfile."""

    adapter: GGUFEntry
    base: GGUFEntry
    modelfile: str | None = None


@dataclass
class CardFacts:
    """Everything the model card says; gathered by the push stage from the run's outputs."""

    repo: str
    base_model: str | None = None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    model_type: str | None = None
    method: str = "lora"
    training: list[tuple[str, str]] = field(default_factory=list)
    data: list[tuple[str, str]] = field(default_factory=list)
    ggufs: list[GGUFEntry] = field(default_factory=list)
    ollama_quant: str | None = None
    modelfiles: list[str] = field(default_factory=list)
    adapter_mode: AdapterFiles | None = None
    adapter: str | None = None
    merged: str | None = None
    eval_passed: bool | None = None
    eval_failures: list[str] = field(default_factory=list)
    eval_report: str | None = None
    private: bool = True
    provenance: list[tuple[str, str]] = field(default_factory=list)  # from the GGUF's forge.* keys
    train_config: str | None = None  # forge.train_config, as indented JSON


METHOD_NAMES = {"lora": "LoRA", "rslora": "rsLoRA", "qlora": "QLoRA", "full": "full fine-tuning"}


def card_metadata(facts: CardFacts) -> dict[str, Any]:
    """The card's YAML front matter (keys the Hub reads: base_model, library_name, license, tags, ...)."""
    meta: dict[str, Any] = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "gguf" if facts.ggufs else ("peft" if facts.adapter else "transformers")
    if facts.license:
        meta["license"] = facts.license
    if facts.datasets:
        meta["datasets"] = list(facts.datasets)
    tags = ["gguf", "ollama", "llama.cpp", "forge", facts.method]
    if facts.model_type:
        tags.append(facts.model_type)
    meta["tags"] = list(dict.fromkeys(tags))
    meta["quantized_by"] = facts.repo.split("/")[0]
    meta["pipeline_tag"] = "text-generation"
    return meta


def render_model_card(facts: CardFacts) -> str:
    """README.md for the repository: front matter, what was trained, the files, how to run it, the eval."""
    name = facts.repo.split("/")[1]
    lines = [
        "---",
        yaml.safe_dump(card_metadata(facts), sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
    ]
    lines += [f"# {name}", ""]
    method = METHOD_NAMES.get(facts.method, facts.method)
    base = (
        f"[{facts.base_model}](https://huggingface.co/{facts.base_model})"
        if facts.base_model
        else "a base model"
    )
    lines += [
        f"A fine-tune of {base} ({method}), made with Forge and exported to GGUF for llama.cpp and Ollama.",
        "",
    ]
    lines += _files_section(facts) + _run_section(facts) + _training_section(facts) + _provenance_section(facts)
    lines += _eval_section(facts)
    return "\n".join(lines).rstrip() + "\n"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _files_section(facts: CardFacts) -> list[str]:
    rows = [
        (f"`{g.path}`", g.quant, human_size(g.size), f"{g.bits_per_weight:.2f}" if g.bits_per_weight else "")
        for g in facts.ggufs
    ]
    pair = facts.adapter_mode
    if pair:
        rows += [
            (f"`{pair.adapter.path}`", f"{pair.adapter.quant} LoRA adapter", human_size(pair.adapter.size), ""),
            (f"`{pair.base.path}`", f"{pair.base.quant} base model", human_size(pair.base.size), ""),
        ]
    lines = ["## Files", ""]
    if rows:
        lines += _table(("file", "type", "size", "bits per weight"), rows)
    for path in facts.modelfiles:
        lines.append(
            f"- `{path}`: Ollama Modelfile for the GGUF of that type (template and stops checked by Forge)"
        )
    if pair and pair.modelfile:
        lines.append(
            f"- `{pair.modelfile}`: Ollama Modelfile that applies `{pair.adapter.path}` to `{pair.base.path}` "
            f"(download the three, then `ollama create {facts.repo.split('/')[1].lower()} -f {pair.modelfile}`)"
        )
    if facts.adapter:
        lines.append(f"- `{facts.adapter}/`: the PEFT adapter (apply it to the base model)")
    if facts.merged:
        lines.append(f"- `{facts.merged}/`: the merged 16-bit model for transformers")
    return lines + [""] if lines[-1] != "" else lines


def _run_section(facts: CardFacts) -> list[str]:
    lines = ["## Run it", ""]
    tag = facts.ollama_quant or (facts.ggufs[0].quant if facts.ggufs else None)
    if tag:
        lines += ["With Ollama:", "", "```sh", f"ollama run hf.co/{facts.repo}:{tag}", "```", ""]
        if facts.modelfiles:
            modelfile = next((m for m in facts.modelfiles if m.startswith(f"{tag}.")), facts.modelfiles[0])
            lines += [
                f"or download the repository and build the model from its Modelfile: "
                f"`ollama create {facts.repo.split('/')[1].lower()} -f {modelfile}`.",
                "",
            ]
        lines += ["With llama.cpp:", "", "```sh", f"llama-cli -hf {facts.repo}:{tag}", "```", ""]
        if facts.private:
            lines += [
                "The repository is private: Ollama needs your Ollama SSH key added to your Hugging Face "
                "account, llama.cpp needs `HF_TOKEN` set.",
                "",
            ]
    if facts.adapter:
        base = facts.base_model or "<base model>"
        lines += [
            "With transformers and PEFT:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{facts.repo}", subfolder="{facts.adapter}")',
            "```",
            "",
        ]
    if facts.merged:
        lines += [
            "The merged model:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{facts.repo}", subfolder="{facts.merged}")',
            "```",
            "",
        ]
    return lines


def _training_section(facts: CardFacts) -> list[str]:
    lines = ["## Training", ""]
    if facts.training:
        lines += _table(("setting", "value"), facts.training)
    if facts.data:
        lines += _table(("data", "value"), facts.data)
    return lines


def _provenance_section(facts: CardFacts) -> list[str]:
    if not facts.provenance and not facts.train_config:
        return []
    lines = [
        "## Provenance",
        "",
        "The GGUF files carry these values in their metadata (`forge.*`, `general.base_model.*`, "
        "`general.dataset.*`). Digests are sha256; a set of files is the sha256 of its `sha256sum` lines.",
        "",
    ]
    if facts.provenance:
        lines += _table(("what", "value"), facts.provenance)
    if facts.train_config:
        lines += ["Training config (`forge.train_config`):", "", "```json", facts.train_config, "```", ""]
    return lines


def _eval_section(facts: CardFacts) -> list[str]:
    lines = ["## Evaluation", ""]
    if facts.eval_passed is not None:
        if facts.eval_passed:
            lines += ["Forge's quality gate passed.", ""]
        else:
            lines += ["**Forge's quality gate failed:**", ""] + [f"- {f}" for f in facts.eval_failures] + [""]
    if facts.eval_report:
        lines += [facts.eval_report.strip(), ""]
    if len(lines) == 2:
        lines += ["No evaluation report.", ""]
    return lines
