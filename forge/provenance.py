"""Where a model came from: the base model, the dataset, the chat template, tool versions, training config.

The base stage records the base model's identity and file digests once (`base.json`); the gguf stage gathers
the rest, writes it into the GGUF as `general.*` and `forge.*` keys (llama.cpp's quantizer copies them into
every quant; with ollama.mode adapter also into the adapter GGUF, and the base's part into the base GGUF) and
into `provenance.json`; the push stage's model card reads it back from the GGUF it uploads.
Nothing here is a timestamp or a local path: the same inputs give the same keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from forge.config import LoadedConfig, section_dump
from forge.models.resolve import ResolvedBase
from forge.pipeline import read_manifest, sha256_file, versions

BUILTIN_HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_URL = re.compile(r"^https?://(?:huggingface\.co|hf\.co)/([\w.-]+/[\w.-]+)/?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
DATASET_PREFIX = "data/"  # the data stage's external inputs are "data/<path inside the dataset>"
CARD_KEYS = ("forge.", "general.base_model.", "general.dataset.")  # what the model card reads back
# what the base GGUF of ollama.mode adapter leaves out: it was not trained, nor is it derived from the base
NOT_TRAINED = ("general.base_model.", "general.dataset.", "forge.dataset.", "forge.train_config")


# --- digests -------------------------------------------------------------------------------------------


def sha256_lines(files: dict[str, str]) -> str:
    """One digest of many files: the sha256 of their `sha256sum` lines (`<sha256>  <name>\\n`, sorted by name).

    For one file `data.jsonl`: `sha256sum data.jsonl | sha256sum` in its folder gives the same digest.
    """
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the base model ------------------------------------------------------------------------------------


def hub_snapshot(path: Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is a snapshot folder of the Hugging Face cache, else None.

    The cache keeps each revision in `models--<org>--<name>/snapshots/<commit>/`.
    """
    repo, snapshots = path.parent.parent.name, path.parent.name
    if snapshots != "snapshots" or not repo.startswith("models--") or not COMMIT.match(path.name):
        return None
    return repo.removeprefix("models--").replace("--", "/", 1), path.name


def base_hub_id(base: dict[str, Any]) -> str | None:
    """The base model's Hub id (from base.json's ref/kind/path): a Hub reference, a known builtin, a folder in
    the Hugging Face cache, or the source repository a GGUF base names."""
    ref, kind, path = base.get("ref", ""), base.get("kind"), Path(base.get("path", ""))
    if ref in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[ref]
    if kind == "hub":
        return ref
    if kind == "folder" and (snapshot := hub_snapshot(path)):
        return snapshot[0]
    if kind == "gguf" and path.is_file():
        urls = read_gguf_strings(path, ("general.source.url", "general.source.repo_url")).values()
        matches = [m.group(1) for m in map(HUB_URL.match, urls) if m]
        return matches[0] if matches else None
    return None


def base_record(resolved: ResolvedBase) -> dict[str, Any]:
    """What base.json records about where the base model came from: Hub id and commit when known, and the
    sha256 of its source files (the GGUF, or the folder's top-level files) with one digest over them all.

    Hashing reads the whole model once, in the base stage; later stages reuse these digests.
    """
    path = resolved.path
    files = (
        {path.name: sha256_file(path)}
        if path.is_file()
        else {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")}
    )
    snapshot = hub_snapshot(path) if path.is_dir() else None
    info = {"ref": resolved.ref, "kind": resolved.kind, "path": str(path)}
    return {
        "hub_id": base_hub_id(info),
        "commit": snapshot[1] if snapshot else None,
        "files": files,
        "sha256": sha256_lines(files),
    }


def _display_ref(base: dict[str, Any]) -> str:
    """base.model as configured, but a local path only by its last part (no home folders in published files)."""
    ref = str(base.get("ref", ""))
    return Path(ref).name if base.get("kind") in ("folder", "gguf") and not ref.startswith("builtin:") else ref


# --- gathering and writing -----------------------------------------------------------------------------


def chat_template_text(model_dir: Path) -> str | None:
    """The chat template the converter writes as the GGUF's tokenizer.chat_template, loaded as the converter
    loads it (of named templates: the default one)."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(model_dir, local_files_only=True).chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def chat_template_sha256(model_dir: Path) -> str | None:
    """sha256 of the chat template the converter writes for `model_dir` (None when it has none)."""
    template = chat_template_text(model_dir)
    return text_sha256(template) if template else None


def collect(loaded: LoadedConfig, base_dir: Path, data_dir: Path, model_dir: Path) -> dict[str, Any]:
    """The provenance of the model in `model_dir`, from the base and data stages' outputs and the config."""
    base = json.loads((base_dir / "base.json").read_text())
    external = (read_manifest(data_dir) or {}).get("external", {})
    dataset = {k.removeprefix(DATASET_PREFIX): v for k, v in external.items() if k.startswith(DATASET_PREFIX)}
    data_path = loaded.config.data.path
    return {
        "base": {
            "model": _display_ref(base),
            "hub_id": base.get("hub_id"),
            "revision": base.get("revision"),
            "commit": base.get("commit"),
            "sha256": base.get("sha256"),
        },
        "dataset": {
            "name": data_path if data_path.startswith("builtin:") else Path(data_path).name,
            "sha256": sha256_lines(dataset),
            "files": dataset,
        },
        "chat_template_sha256": chat_template_sha256(model_dir),
        "versions": versions(),
        "train_config": section_dump(loaded.config, "train"),
    }


def gguf_metadata(prov: dict[str, Any]) -> dict[str, Any]:
    """The GGUF keys of a provenance: standard general.base_model.* / general.dataset.* and forge.*."""
    base, dataset, found = prov["base"], prov["dataset"], prov["versions"]
    meta: dict[str, Any] = {"general.base_model.count": 1}
    if base["hub_id"]:
        org, name = base["hub_id"].split("/", 1)
        meta |= {
            "general.base_model.0.name": name,
            "general.base_model.0.organization": org,
            "general.base_model.0.repo_url": f"https://huggingface.co/{base['hub_id']}",
        }
    else:
        meta["general.base_model.0.name"] = base["model"]
    meta |= {"general.dataset.count": 1, "general.dataset.0.name": dataset["name"]}
    meta["forge.version"] = found.get("forge-llm", "unknown")
    meta |= {f"forge.versions.{k.replace('-', '_')}": v for k, v in sorted(found.items()) if k != "forge-llm"}
    meta["forge.base.model"] = base["model"]
    meta |= {f"forge.base.{k}": base[k] for k in ("revision", "commit", "sha256") if base[k]}
    meta["forge.dataset.sha256"] = dataset["sha256"]
    meta["forge.dataset.files"] = json.dumps(dataset["files"], sort_keys=True)
    if prov["chat_template_sha256"]:
        meta["forge.chat_template.sha256"] = prov["chat_template_sha256"]
    meta["forge.train_config"] = json.dumps(prov["train_config"], sort_keys=True)
    return meta


def base_gguf_metadata(prov: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    """The GGUF keys of the base model's own GGUF (ollama.mode adapter): the base's identity and digests and the
    tools that wrote it, with `chat_template` (sha256 of its own template). No dataset or training keys (it was
    not trained) and no general.base_model.* (it is the base, not a model made from it): a known Hub id goes
    into general.source.repo_url, where a GGUF names its source."""
    keys = gguf_metadata({**prov, "chat_template_sha256": chat_template})
    meta = {k: v for k, v in keys.items() if not k.startswith(NOT_TRAINED)}
    if prov["base"]["hub_id"]:
        meta["general.source.repo_url"] = f"https://huggingface.co/{prov['base']['hub_id']}"
    return meta


# --- reading it back (the model card) ------------------------------------------------------------------


def card_rows(keys: dict[str, str]) -> tuple[list[tuple[str, str]], str | None]:
    """The model card's provenance table and training config (pretty JSON) from a GGUF's string keys."""
    rows: list[tuple[str, str]] = []
    hub = keys.get("general.base_model.0.repo_url", "").removeprefix("https://huggingface.co/")
    model = keys.get("forge.base.model")
    if model:
        rows.append(("base model", f"{hub} (`{model}`)" if hub and hub != model else model))
    for key, label in (("forge.base.revision", "base revision"), ("forge.base.commit", "base commit")):
        if key in keys:
            rows.append((label, f"`{keys[key]}`"))
    if "forge.base.sha256" in keys:
        rows.append(("base files sha256", f"`{keys['forge.base.sha256']}`"))
    if "forge.dataset.sha256" in keys:
        count = len(json.loads(keys.get("forge.dataset.files", "{}")))
        name = keys.get("general.dataset.0.name", "dataset")
        rows.append(("dataset", f"{name} ({count} file{'s' if count != 1 else ''})"))
        rows.append(("dataset sha256", f"`{keys['forge.dataset.sha256']}`"))
    if "forge.chat_template.sha256" in keys:
        rows.append(("chat template sha256", f"`{keys['forge.chat_template.sha256']}`"))
    if "forge.version" in keys:
        rows.append(("Forge", keys["forge.version"]))
    rows += [(k.removeprefix("forge.versions."), v) for k, v in sorted(keys.items()) if k.startswith("forge.versions.")]
    config = keys.get("forge.train_config")
    return rows, json.dumps(json.loads(config), indent=2, sort_keys=True) if config else None


GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type id -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9


def read_gguf_strings(path: Path, keys: tuple[str, ...] = (), prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The string values of some metadata keys of a GGUF (named, or under a prefix), read from its header
    without parsing the rest.

    gguf.GGUFReader decodes every field, the vocabulary included (seconds for a 50k-token model); this skips
    what it does not want and, given only names, stops as soon as they are found.
    """
    found: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            magic, _version, _tensors, count = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF":
                return {}
            for _ in range(count):
                key = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", "replace")
                kind = struct.unpack("<I", f.read(4))[0]
                if kind == GGUF_STRING and (key in keys or (prefixes and key.startswith(prefixes))):
                    found[key] = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", "replace")
                    if not prefixes and len(found) == len(keys):
                        break
                else:
                    _skip_gguf_value(f, kind)
    except (OSError, struct.error, KeyError):
        return found
    return found


def _skip_gguf_value(f: Any, kind: int) -> None:
    if kind == GGUF_STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
    elif kind == GGUF_ARRAY:
        item, n = struct.unpack("<IQ", f.read(12))
        if item in GGUF_SCALAR_SIZES:
            f.seek(GGUF_SCALAR_SIZES[item] * n, 1)
        else:
            for _ in range(n):
                _skip_gguf_value(f, item)
    else:
        f.seek(GGUF_SCALAR_SIZES[kind], 1)
