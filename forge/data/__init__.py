"""forge.data: dataset formats, chat templating, response-only masking, packing (docs/data.md)."""

from forge.data.errors import DataError

__all__ = ["DataError"]
