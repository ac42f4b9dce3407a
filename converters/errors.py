"""The one error type the converter and quantizer raise for bad input."""


class ConversionError(ValueError):
    """Input that cannot be converted or quantized; the message names the file and the key or tensor."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line, for wrapping library errors into a ConversionError."""
    return " ".join(str(error).split())
