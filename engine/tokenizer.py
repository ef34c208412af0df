"""Tokenizer from a checkpoint directory (tokenizer.json + tokenizer_config.json) and streaming detokenization."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from qwenpd.tokens import token_text


# Bounds of Tokenizer.encode_at_most: a normalizer can shorten a text (NFC composes characters); a piece boundary
# can change the tokens next to it; pieces are short enough for one encode call to be a short pause.
NORMALIZE_SLACK = 4
SEAM_SLACK = 64
PIECE_CHARS = 1 << 16


class TokenizerError(ValueError):
    pass


class TemplateArgumentError(TokenizerError):
    """A chat template argument a caller may not give (one the server sets itself)."""


# What a chat template gets from the server itself; callers' template arguments may not set these.
TEMPLATE_NAMES = ("messages", "tools", "add_generation_prompt", "enable_thinking", "bos_token", "eos_token")


def _cut(text: str, at: int) -> int:
    """A cut at or after `at`: just before a space that follows a non-space (or the end)."""
    if at >= len(text):
        return len(text)
    found = text.find(" ", at)
    while found != -1 and text[found - 1].isspace():
        found = text.find(" ", found + 1)
    return len(text) if found == -1 else found


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the checkpoint's special tokens and chat template."""

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what the grammar library reads)."""
        return self._tok.to_str()

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {model_dir}")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()
        self.eos_token: str | None = _token_text(cfg.get("eos_token"))
        self.bos_token: str | None = _token_text(cfg.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # The most characters one token stands for (byte-level BPE: one per byte of its piece): a text of n
        # characters has at least n / (that x NORMALIZE_SLACK) tokens, whatever it says.
        self.max_token_chars = max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)
        self._added = {i for i, t in self._tok.get_added_tokens_decoder().items()}
        self._bytes: dict[int, bytes] = {}
        self._byte_level_decoder: bool | None = None  # _byte_level()

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for on its own (OpenAI's logprobs `bytes`): a byte-level BPE token maps
        its piece back through the byte alphabet (so a token holding part of a character gives that part, not a
        replacement character), a byte-fallback token `<0xNN>` its byte, an added token its text, anything else
        its text decoded alone."""
        got = self._bytes.get(token_id)
        if got is None:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                got = b""
            elif token_id in self._added:
                got = piece.encode()
            elif self._byte_level() and all(c in _UNICODE_TO_BYTE for c in piece):
                got = bytes(_UNICODE_TO_BYTE[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                got = bytes([int(piece[3:5], 16)])
            else:
                got = self._tok.decode([token_id], skip_special_tokens=False).encode()
            self._bytes[token_id] = got
        return got

    def _byte_level(self) -> bool:
        """Whether the decoder is byte-level (read once, on the first token_bytes: loading does not pay for it)."""
        if self._byte_level_decoder is None:
            self._byte_level_decoder = _uses_byte_level(json.loads(self._tok.to_str()))
        return self._byte_level_decoder

    def token_text(self, token_id: int) -> str:
        """A token's own text for logprobs: its bytes as UTF-8, or `bytes:\\xNN...` (OpenAI's spelling) when they
        are not whole characters."""
        return token_text(self.token_bytes(token_id))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def max_text_chars(self, limit: int) -> int:
        """The most characters a text of at most `limit` tokens can have (longer ones are refused unread)."""
        return limit * self.max_token_chars * NORMALIZE_SLACK

    def encode_at_most(self, text: str, limit: int) -> list[int] | None:
        """The ids of `text`, or None once it certainly has more than `limit` tokens, found without tokenizing
        all of it: `tokenizers` holds the GIL for a whole call (a 10 MB text: ~8 s with every other thread of the
        process stopped, and gigabytes for the encoding). A text too long for any tokenization is refused from
        its length; a long one is counted piece by piece (pieces cut before a space, where pre-tokenizers cut
        too, each allowed SEAM_SLACK tokens of error), stopping as soon as the count is past the limit; only
        what may fit is encoded whole."""
        if len(text) > self.max_text_chars(limit):
            return None
        if len(text) > PIECE_CHARS:
            counted, seams, start = 0, 0, 0
            while start < len(text):
                end = _cut(text, start + PIECE_CHARS)
                counted += len(self._tok.encode(text[start:end], add_special_tokens=False).ids)
                if counted - SEAM_SLACK * seams > limit:
                    return None
                start, seams = end, seams + 1
        return self.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, tools: Sequence[dict[str, Any]] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> str:
        """Render chat messages ([{"role", "content", optional "tool_calls", "tool_call_id", "name",
        "reasoning_content"}]; content a string, or parts [{"type": "text", "text"}, {"type": "image"},
        {"type": "video"}] as multimodal templates take them) with the checkpoint's Jinja template; `tools` (OpenAI's tool list) as the template's
        `tools`.

        enable_thinking is passed to the template (Qwen3.5 templates read it); None leaves the template's default.
        """
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat template; send a plain prompt instead")
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson  # as transformers renders templates: no HTML escaping
        for m in messages:
            content = m.get("content")
            parts = isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                      for p in content)
            if not isinstance(m.get("role"), str) or not (isinstance(content, str) or parts):
                raise TokenizerError("each chat message needs a string 'role' and a 'content' (a string, or parts "
                                     "with a 'type')")
            if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
                raise TokenizerError("a message's 'tool_calls' must be a list")
        taken = set(TEMPLATE_NAMES) & set(template_kwargs or {})
        if taken:
            raise TemplateArgumentError(f"template argument {sorted(taken)[0]!r} is set by the server, not by a caller")
        extra: dict[str, Any] = dict(template_kwargs or {})
        if enable_thinking is not None:
            extra["enable_thinking"] = enable_thinking
        if tools:
            extra["tools"] = list(tools)
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token or "", bos_token=self.bos_token or "", **extra)
        except TokenizerError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # the checkpoint's template cannot render these messages (e.g. content parts a text-only template
            # concatenates as a string): the request's to change, not a server fault
            raise TokenizerError(f"the chat template cannot render these messages: {type(exc).__name__}: "
                                 f"{exc}") from None


def candidates(tokenizer: "Tokenizer | None", top: Sequence[tuple[int, float]]
               ) -> tuple[tuple[int, float, str, bytes], ...]:
    """(id, log-probability, the token's own text, its own bytes) of a position's most likely tokens (empty
    without a tokenizer)."""
    if tokenizer is None:
        return tuple((i, lp, "", b"") for i, lp in top)
    return tuple((i, lp, tokenizer.token_text(i), tokenizer.token_bytes(i)) for i, lp in top)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte alphabet (what byte-level BPE pieces are spelled in), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _bytes_to_unicode()


def _uses_byte_level(spec: dict[str, Any]) -> bool:
    """Whether tokenizer.json decodes byte-level pieces (a ByteLevel decoder, alone or in a sequence)."""
    dec = spec.get("decoder") or {}
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TokenizerError(message)


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.

    Decodes a short window of trailing tokens each step; text that ends in an incomplete UTF-8 sequence
    (U+FFFD) is held back until the next token completes it, or until `flush` at the end of the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), unread: int = 0):
        """`unread`: how many of the last `prompt_ids` are generated tokens not yet turned into text (a resumed
        sequence that broke off inside a multi-byte character)."""
        self._tok = tokenizer
        keep = 6 + unread  # a little context so the first delta decodes like the rest
        self.ids: list[int] = list(prompt_ids[-keep:]) if keep else []
        self._prefix_offset = 0
        self._read_offset = max(0, len(self.ids) - unread)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        return self._read(final=False)

    def flush(self) -> str:
        """The text of the ids still held back, an incomplete UTF-8 character as U+FFFD (as a UTF-8 decoder with
        errors="replace" ends): for the end of a sequence, when no later token can complete it."""
        return self._read(final=True) if self.unread else ""

    def _read(self, final: bool) -> str:
        prefix = self._tok.decode(self.ids[self._prefix_offset:self._read_offset])
        full = self._tok.decode(self.ids[self._prefix_offset:])
        if (full.endswith("\ufffd") and not final) or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.text += delta
        return delta

    @property
    def unread(self) -> int:
        """Ids pushed but not yet turned into text."""
        return len(self.ids) - self._read_offset
