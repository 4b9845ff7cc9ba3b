"""Anthropic Messages API (``/v1/messages``), also served by Vertex AI and Anthropic-compatible gateways."""

from __future__ import annotations

from .base import KIND_REASONING, KIND_TEXT, KIND_TOOL_CALL, Decoder, Part, error_text

# Events with nothing to read: decided from the event line alone, without parsing the data.
_SKIP = frozenset({"ping", "content_block_stop", "message_stop"})
_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


class AnthropicDecoder(Decoder):
    provider = "anthropic"

    def _decode(self, event: str, data: str) -> list[Part] | None:
        if event in _SKIP:
            return None
        return super()._decode(event, data)

    def _handle(self, event: str, obj: dict) -> list[Part] | None:
        etype = obj.get("type") or event
        if etype == "content_block_delta":
            delta = obj["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                return [(KIND_TEXT, delta.get("text") or "", None)]
            if dtype == "input_json_delta":
                return [(KIND_TOOL_CALL, delta.get("partial_json") or "", (obj.get("index"), None, None))]
            if dtype == "thinking_delta":
                return [(KIND_REASONING, delta.get("thinking") or "", None)]
            # signature_delta (an opaque signature of the thinking) and citations_delta are not content.
            return None
        if etype == "content_block_start":
            block = obj.get("content_block") or {}
            btype = block.get("type")
            if btype in _TOOL_BLOCKS:
                # Announces the call (id, name); its arguments follow as input_json_delta.
                return [(KIND_TOOL_CALL, "", (obj.get("index"), block.get("id"), block.get("name")))]
            if btype == "text":
                return [(KIND_TEXT, block.get("text") or "", None)]
            if btype == "thinking":
                return [(KIND_REASONING, block.get("thinking") or "", None)]
            return None  # redacted_thinking: encrypted, not readable content
        if etype == "message_delta":
            stop = (obj.get("delta") or {}).get("stop_reason")
            if stop:
                self.stop_reason = stop
            self._usage(obj.get("usage"), final=True)
            return None
        if etype == "message_start":
            msg = obj.get("message") or {}
            self._set_model(msg.get("model"))
            # message_start's output_tokens is a placeholder (1-ish): only message_delta's count is kept.
            self._usage(msg.get("usage"), final=False)
            return None
        if etype == "error":
            self.error = error_text(obj.get("error") or obj)
        return None

    def _usage(self, usage: object, final: bool) -> None:
        if not isinstance(usage, dict):
            return
        # input_tokens is kept as Anthropic reports it: it excludes cache_read/cache_creation tokens.
        self._set_tokens(usage.get("input_tokens"), usage.get("output_tokens") if final else None)
