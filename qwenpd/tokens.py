"""How a token's own bytes are written as text in log-probabilities, shared by decode (which knows the bytes) and
the gateway (which shows them): a token holding part of a UTF-8 character has no text of its own."""

from __future__ import annotations


def token_text(raw: bytes) -> str:
    """Bytes of a token as text: UTF-8 when they are whole characters, else `bytes:\\xe2\\x80` as OpenAI writes a
    partial character (never a replacement character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
