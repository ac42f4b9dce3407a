"""Opening a GGUF with llama.cpp (llama-cpp-python): thread count, load time, vocabulary facts."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from forge.eval.errors import EvalError


def default_threads() -> int:
    """Half the logical CPUs (about the physical cores): more threads than cores makes llama.cpp crawl."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextmanager
def open_gguf(
    path: Path, n_ctx: int, threads: int | None = None, logits_all: bool = False, vocab_only: bool = False
) -> Iterator[tuple[Any, float]]:
    """The GGUF loaded by llama.cpp (or only its vocabulary) and the seconds the load took; freed on exit."""
    import llama_cpp

    if not Path(path).is_file():
        raise EvalError(f"{path}: GGUF file not found")
    n = threads or default_threads()
    started = time.perf_counter()
    try:
        # A vocabulary-only load has no training context, so llama.cpp warns about any context size.
        with _stderr_silenced() if vocab_only else nullcontext():
            llm = llama_cpp.Llama(
                str(path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_threads=n,
                n_threads_batch=n,
                logits_all=logits_all,
                vocab_only=vocab_only,
                verbose=False,
            )
    except (ValueError, RuntimeError) as exc:
        raise EvalError(f"{path}: llama.cpp cannot load it ({exc})") from exc
    seconds = time.perf_counter() - started
    try:
        yield llm, seconds
    finally:
        llm.close()


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (where llama.cpp logs) to /dev/null for the duration."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def token_text(llm: Any, token: int) -> str:
    """The token's text as llama.cpp stores it (special tokens included)."""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def is_eog(llm: Any, token: int) -> bool:
    """True when llama.cpp ends generation at this token (EOS, EOT and the other end tokens)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(_vocab(llm), token))


def is_control(llm: Any, token: int) -> bool:
    """True when the token is a control (special) token rather than text."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_attr(_vocab(llm), token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)


def eos_token(llm: Any) -> int:
    """The vocabulary's EOS id (-1 when the GGUF has none)."""
    import llama_cpp

    return int(llama_cpp.llama_vocab_eos(_vocab(llm)))


def bos_token(llm: Any) -> int:
    """The vocabulary's BOS id (-1 when the GGUF has none)."""
    import llama_cpp

    return int(llama_cpp.llama_vocab_bos(_vocab(llm)))


def _vocab(llm: Any) -> Any:
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)
