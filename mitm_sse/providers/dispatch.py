"""Choosing a decoder: from the URL when it is conclusive, else from the first events (``SniffingDecoder``)."""

from __future__ import annotations

from .anthropic import AnthropicDecoder
from .base import Decoder, Part, RequestInfo, loads
from .gemini import GeminiDecoder
from .generic import GenericDecoder
from .ollama import OllamaDecoder
from .openai_chat import OpenAIChatDecoder
from .openai_responses import OpenAIResponsesDecoder

_ANTHROPIC_EVENTS = frozenset(
    {"message_start", "content_block_start", "content_block_delta", "message_delta"}
)
# Past this many JSON events without a recognisable shape the stream is treated as generic for good, so a
# later event that merely looks like another format cannot switch decoders mid-stream.
_SNIFF_LIMIT = 8
_SYNCED = ("provider", "model", "input_tokens", "output_tokens", "stop_reason", "error")


def _by_route(info: RequestInfo) -> type[Decoder] | None:
    path = info.path.split("?", 1)[0].rstrip("/")
    host = info.host.lower()
    if ":streamGenerateContent" in path:
        return GeminiDecoder
    if path.endswith("/responses"):
        return OpenAIResponsesDecoder
    if path.endswith("/completions"):  # /chat/completions and legacy /completions
        return OpenAIChatDecoder
    if path.endswith("/v1/messages") or "anthropic.com" in host or "/publishers/anthropic/" in path:
        return AnthropicDecoder
    # Ollama streams NDJSON. An SSE `/api/chat` is usually a web app's own route (Vercel AI SDK...): sniff it.
    if path.endswith(("/api/chat", "/api/generate")) and "event-stream" not in info.content_type:
        return OllamaDecoder
    if "generativelanguage.googleapis.com" in host:
        return GeminiDecoder
    return None


def _by_shape(event: str, obj: dict) -> type[Decoder] | None:
    etype = obj.get("type")
    if event in _ANTHROPIC_EVENTS or etype in _ANTHROPIC_EVENTS:
        return AnthropicDecoder
    if isinstance(etype, str) and etype.startswith("response."):
        return OpenAIResponsesDecoder
    if isinstance(obj.get("choices"), list) or obj.get("object") in (
        "chat.completion.chunk",
        "text_completion",
    ):
        return OpenAIChatDecoder
    if "candidates" in obj or "usageMetadata" in obj:
        return GeminiDecoder
    if "done" in obj and "created_at" in obj and ("message" in obj or "response" in obj):
        return OllamaDecoder
    return None


class SniffingDecoder(GenericDecoder):
    """Generic until an event shows a known format, then that format's decoder for the rest of the stream.

    The inner decoder's metadata is copied onto this object after each event, so callers read the same
    attributes whatever was detected.
    """

    def __init__(self, info: RequestInfo) -> None:
        super().__init__(info)
        self._inner: Decoder | None = None
        self._sniffed = 0

    def _decode(self, event: str, data: str) -> list[Part] | None:
        inner = self._inner
        if inner is not None:
            parts = inner._decode(event, data)
            self._sync(inner)
            return parts
        if self._sniffed >= _SNIFF_LIMIT or data == "[DONE]":
            return super()._decode(event, data)
        obj = loads(data)
        if not isinstance(obj, dict):
            return None
        self._sniffed += 1
        cls = _by_shape(event, obj)
        if cls is None:
            return self._handle(event, obj)
        inner = self._inner = cls(self.info)
        if inner.model is None:
            inner.model = self.model
        parts = inner._handle(event, obj)
        self._sync(inner)
        return parts

    def _sync(self, inner: Decoder) -> None:
        for name in _SYNCED:
            setattr(self, name, getattr(inner, name))


def decoder_for(info: RequestInfo) -> Decoder:
    """A fresh decoder for one stream. Never None: unknown routes get a sniffing generic decoder."""
    cls = _by_route(info)
    if cls is None:
        return SniffingDecoder(info)
    return cls(info)
