"""Incremental content decoders (Content-Encoding) used only for parsing events.

The raw bytes are what the store keeps; decoding happens on the writer thread so that a compressed stream
still yields parsed events. A corrupt body raises DecodeError once; the caller stops parsing that stream
and records the error, the raw chunks are kept regardless.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

__all__ = ["DecodeError", "make_decoder", "SUPPORTED"]

SUPPORTED = ("identity", "gzip", "x-gzip", "deflate", "br", "zstd")
# A decoder may not expand one chunk into more than this: a small "zip bomb" chunk must not exhaust memory.
MAX_OUTPUT_PER_CHUNK = 64 * 1024 * 1024


class DecodeError(Exception):
    pass


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)
        self._raw_fallback = wbits == zlib.MAX_WBITS  # "deflate" is often sent as raw deflate in practice
        self._first = True

    def __call__(self, data: bytes) -> bytes:
        try:
            out = self._d.decompress(data, MAX_OUTPUT_PER_CHUNK)
        except zlib.error as e:
            if self._first and self._raw_fallback:
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                self._raw_fallback = False
                return self(data)
            raise DecodeError(f"deflate/gzip: {e}") from None
        self._first = False
        if self._d.unconsumed_tail:
            raise DecodeError("decoded chunk exceeds 64 MiB")
        return out

    def finish(self) -> str | None:
        return None if self._d.eof else "compressed body ended before its end marker (truncated or corrupt)"


class _Brotli:
    def __init__(self) -> None:
        import brotli  # mitmproxy depends on it

        self._d = brotli.Decompressor()

    def __call__(self, data: bytes) -> bytes:
        try:
            return self._d.process(data)
        except Exception as e:  # brotli.error
            raise DecodeError(f"br: {e}") from None

    def finish(self) -> str | None:
        return None if self._d.is_finished() else "br body ended before its end marker (truncated or corrupt)"


class _Zstd:
    def __init__(self) -> None:
        import zstandard  # mitmproxy depends on it

        self._d = zstandard.ZstdDecompressor().decompressobj()

    def __call__(self, data: bytes) -> bytes:
        try:
            return self._d.decompress(data)
        except Exception as e:  # zstandard.ZstdError
            raise DecodeError(f"zstd: {e}") from None

    def finish(self) -> str | None:
        return None if self._d.eof else "zstd body ended before its end marker (truncated or corrupt)"


def make_decoder(content_encoding: str | None) -> Callable[[bytes], bytes] | None:
    """A callable bytes -> bytes for the encoding chain, None for identity.

    Raises DecodeError for an unknown encoding. Multiple codings ("gzip, br") are undone in reverse order.
    """
    if not content_encoding:
        return None
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    steps: list[Callable[[bytes], bytes]] = []
    for c in reversed(codings):
        if c in ("gzip", "x-gzip"):
            steps.append(_Zlib(16 + zlib.MAX_WBITS))
        elif c == "deflate":
            steps.append(_Zlib(zlib.MAX_WBITS))
        elif c == "br":
            steps.append(_Brotli())
        elif c == "zstd":
            steps.append(_Zstd())
        else:
            raise DecodeError(f"unsupported content-encoding {c!r}")
    if len(steps) == 1:
        return steps[0]

    return _Chain(steps)


class _Chain:
    def __init__(self, steps: list) -> None:
        self.steps = steps

    def __call__(self, data: bytes) -> bytes:
        for step in self.steps:
            data = step(data)
        return data

    def finish(self) -> str | None:
        return next((e for e in (s.finish() for s in self.steps) if e), None)
