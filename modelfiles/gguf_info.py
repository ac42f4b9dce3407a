"""What a Modelfile needs from a GGUF: its chat template, BOS/EOS texts, add_bos_token and special tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader, Keys, TokenType

_SPECIAL_TYPES = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED)}


@dataclass(frozen=True)
class GGUFChatInfo:
    """The tokenizer facts of a GGUF that shape its chat prompt.

    special_tokens are the texts of its control and user-defined tokens; template_variables are the
    token texts a chat template may read (bos_token, eos_token, unk_token, pad_token); architecture is
    general.architecture (None when the file has none).
    """

    chat_template: str | None
    add_bos_token: bool
    special_tokens: frozenset[str]
    template_variables: dict[str, str]
    architecture: str | None = None

    @property
    def bos_token(self) -> str:
        return self.template_variables.get("bos_token", "")

    @property
    def eos_token(self) -> str:
        return self.template_variables.get("eos_token", "")


def read_gguf_chat_info(path: str | Path) -> GGUFChatInfo:
    """Read the chat facts of a GGUF model file; ValueError names the file and the missing key."""
    reader = GGUFReader(path)
    fields = reader.fields

    def need(key: str):
        if key not in fields:
            raise ValueError(f"{path}: the GGUF has no {key}")
        return fields[key].contents()

    tokens = need(Keys.Tokenizer.LIST)
    types = need(Keys.Tokenizer.TOKEN_TYPE)
    add_bos = bool(need(Keys.Tokenizer.ADD_BOS))
    variables = {}
    for name, key in (("bos_token", Keys.Tokenizer.BOS_ID), ("eos_token", Keys.Tokenizer.EOS_ID),
                      ("unk_token", Keys.Tokenizer.UNK_ID), ("pad_token", Keys.Tokenizer.PAD_ID)):
        if key in fields:
            token_id = int(fields[key].contents())
            if not 0 <= token_id < len(tokens):
                raise ValueError(f"{path}: {key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
            variables[name] = tokens[token_id]
    template = fields[Keys.Tokenizer.CHAT_TEMPLATE].contents() if Keys.Tokenizer.CHAT_TEMPLATE in fields else None
    return GGUFChatInfo(
        chat_template=template,
        add_bos_token=add_bos,
        special_tokens=frozenset(t for t, kind in zip(tokens, types, strict=True) if kind in _SPECIAL_TYPES),
        template_variables=variables,
        architecture=fields[Keys.General.ARCHITECTURE].contents() if Keys.General.ARCHITECTURE in fields else None,
    )
