"""Load `--chat-template`: a file path or the template text itself (the protocol core does no IO)."""

from __future__ import annotations

from protocol.chat_template import looks_like_file_path


def load_chat_template(value: str | None) -> str | None:
    """The template text: the file's content when `value` names a file, else `value` itself.

    As vLLM does: an inline template has its backslash escapes decoded (so `\\n` on a command
    line is a newline), and a value with no jinja characters that is not a readable file is an error.
    """
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as file:
            return file.read()
    except (OSError, ValueError) as exc:
        if looks_like_file_path(value):
            raise ValueError(
                f"The supplied chat template ({value}) looks like a file path, but it failed to be opened. "
                f"Reason: {exc}"
            ) from exc
    # backslashreplace keeps characters beyond latin-1 intact through the escape decoding
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
