"""The local Hub stand-in for the push tests (tests/forge/test_hub.py, tests/forge/stages/test_push.py)."""

from __future__ import annotations

import importlib.util
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def _load_hub_endpoint():
    """tests/forge/hub_endpoint.py by path (pytest does not put tests/forge on sys.path)."""
    spec = importlib.util.spec_from_file_location("hub_endpoint", Path(__file__).with_name("hub_endpoint.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hub_endpoint = _load_hub_endpoint()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[hub_endpoint.FakeHub]:
    """A FakeHub on 127.0.0.1 that huggingface_hub talks to, with a fresh write token in HF_TOKEN (hub.token).

    huggingface_hub reads HF_ENDPOINT, HF_HUB_DISABLE_XET and the token file's path once, at import, so the
    module constants are set as well as the environment. Xet is off: the stand-in speaks Git LFS only.
    No local login: the token file points into tmp_path.
    """
    from huggingface_hub import close_session, constants

    with hub_endpoint.serve_hub() as fake:
        fake.token = "hf_" + secrets.token_hex(16)
        fake.tokens[fake.token] = "write"
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", fake.token)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        yield fake
        close_session()  # drop pooled connections to this server before it stops
