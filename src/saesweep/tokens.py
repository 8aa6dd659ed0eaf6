"""Tokens as people read them. A byte-level BPE token may hold part of a multi-byte UTF-8 character
(Chinese, Japanese, accented letters in some merges): decoded alone it is U+FFFD. Here each token's
bytes are recovered from the tokenizer's vocabulary; in running text a character split over tokens is
shown once, on the token that holds its first byte (the tokens holding only its continuation bytes
show as "" and say so on hover), and a byte that belongs to no valid character is shown as ⟨0xE4⟩.
"""

from __future__ import annotations

import functools
import re

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece's byte tokens
_SENTENCEPIECE_SPACE = "▁"


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte → printable character table, inverted (character → byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def escape_byte(b: int) -> str:
    return f"⟨0x{b:02X}⟩"


def _characters(data: bytes) -> list[tuple[int, str]]:
    """(offset of its first byte, text) for each character of `data`; bytes that are not part of a valid
    UTF-8 character become escapes of their own."""
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        n = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF5 else 0
        try:
            if not n:
                raise UnicodeDecodeError("utf-8", data, i, i + 1, "not a lead byte")
            out.append((i, data[i : i + n].decode("utf-8")))
            i += n
        except UnicodeDecodeError:
            out.append((i, escape_byte(lead)))
            i += 1
    return out


class ReadableTokens:
    """Display text of token ids for one tokenizer: `sequence` for running text (a context), `single`
    for tokens shown one by one (logit lens, lists)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self._recover_bytes(token)
        return self._bytes[token]

    def _recover_bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if token in self._special:
                return piece.encode("utf-8")
            alphabet = _byte_level_alphabet()
            if piece and all(ch in alphabet for ch in piece):
                return bytes(alphabet[ch] for ch in piece)
            if match := _BYTE_FALLBACK.match(piece):
                return bytes([int(match.group(1), 16)])
            if _SENTENCEPIECE_SPACE in piece:
                return piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")
        return self.tokenizer.decode([token]).encode("utf-8")

    def single(self, tokens) -> list[str]:
        """Each token on its own: its complete characters, and escapes for the bytes of partial ones."""
        return ["".join(text for _, text in _characters(self.token_bytes(int(t)))) for t in tokens]

    def sequence(self, tokens) -> list[str]:
        """Tokens of running text: each character on the token that holds its first byte."""
        pieces = [self.token_bytes(int(t)) for t in tokens]
        starts, offset = [], 0
        for piece in pieces:
            starts.append(offset)
            offset += len(piece)
        out = [""] * len(pieces)
        owner = 0
        for at, text in _characters(b"".join(pieces)):
            while owner + 1 < len(pieces) and starts[owner + 1] <= at:
                owner += 1
            out[owner] += text
        return out
