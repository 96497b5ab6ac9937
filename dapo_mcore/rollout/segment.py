"""Token-level step segmentation with exact token boundaries.

A solution (token ids) is split into steps on a delimiter string (default ``"\\n"``) without
re-tokenising: every step is a slice of the original ids, so ``prompt + steps[:k]`` is exactly the
token sequence the model produced and the one used in training.

Rules
- The delimiter is matched on the *bytes* the tokens decode to (:class:`TokenBytes`), so unicode
  delimiters and delimiters spanning several tokens work. A step ends after the token that
  contains the end of a delimiter (if a token holds ``".\\nThe"``, the cut falls after it).
- Empty steps (nothing but whitespace/delimiters, or only special tokens such as EOS) are merged
  into the previous step; leading empty steps merge into the first non-empty one.
- A trailing delimiter ends the last step (no empty step after it).
"""
from __future__ import annotations

import bisect
import json
import re
from functools import lru_cache

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: unicode char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenBytes:
    """Table ``token id -> bytes it decodes to`` for a HF tokenizer (special tokens -> ``b""``).

    Handles byte-level BPE (GPT-2/Qwen/Llama-3 style) exactly and SentencePiece-style tokens
    (``▁`` spaces, ``<0xNN>`` byte fallback); other tokenizers fall back to ``decode([id])``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab_size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        try:
            spec = json.loads(tokenizer.backend_tokenizer.to_str())
            dec = spec.get("decoder") or {}
            kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
            added = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        except AttributeError:  # slow tokenizer
            kinds, added = set(), set()
        special |= added
        tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        bd = _byte_decoder()
        table: list[bytes] = []
        for i, t in enumerate(tokens):
            if i in special or t is None:
                table.append(b"")
            elif "ByteLevel" in kinds and all(c in bd for c in t):
                table.append(bytes(bd[c] for c in t))
            elif (m := _BYTE_FALLBACK.match(t)) is not None:
                table.append(bytes([int(m.group(1), 16)]))
            elif "Metaspace" in kinds or "▁" in t:
                table.append(t.replace("▁", " ").encode())
            else:
                table.append(tokenizer.decode([i]).encode())
        self.table = table

    def __call__(self, ids: list[int]) -> list[bytes]:
        t = self.table
        return [t[i] if 0 <= i < len(t) else b"" for i in ids]

    def text(self, ids: list[int]) -> str:
        return b"".join(self(ids)).decode("utf-8", errors="replace")


def _is_empty(step_bytes: bytes, delim: bytes) -> bool:
    return not step_bytes.replace(delim, b"").strip()


def split_steps(ids: list[int], token_bytes: TokenBytes, delimiter: str = "\n") -> list[list[int]]:
    """Split ``ids`` into steps (lists of ids whose concatenation is ``ids``); see module doc."""
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    ids = list(ids)
    if not ids:
        return []
    d = delimiter.encode("utf-8")
    pieces = token_bytes(ids)
    ends, pos = [], 0
    for p in pieces:
        pos += len(p)
        ends.append(pos)
    data = b"".join(pieces)
    cuts: list[int] = []   # cut after token index
    start = 0
    while True:
        hit = data.find(d, start)
        if hit < 0:
            break
        tok = bisect.bisect_left(ends, hit + len(d))
        cuts.append(tok)
        start = max(hit + len(d), ends[tok])
    raw, prev = [], 0
    for c in cuts:
        raw.append(ids[prev:c + 1])
        prev = c + 1
    if prev < len(ids):
        raw.append(ids[prev:])
    steps: list[list[int]] = []
    pending: list[int] = []   # leading empty steps, merged forward
    for s in raw:
        if _is_empty(b"".join(token_bytes(s)), d):
            if steps:
                steps[-1].extend(s)
            else:
                pending.extend(s)
        else:
            steps.append(pending + s)
            pending = []
    if pending:  # nothing but empty steps
        steps.append(pending)
    return steps


def first_step(ids: list[int], token_bytes: TokenBytes, delimiter: str = "\n") -> tuple[list[int], bool]:
    """First step of a completion and whether it is the whole completion (ends the solution)."""
    steps = split_steps(ids, token_bytes, delimiter)
    if not steps:
        return [], True
    return steps[0], len(steps) == 1
