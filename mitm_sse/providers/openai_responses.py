"""OpenAI Responses API (``/v1/responses``): typed events, ``event:`` equal to the data's ``type``."""

from __future__ import annotations

from .base import KIND_REASONING, KIND_REFUSAL, KIND_TEXT, KIND_TOOL_CALL, Decoder, Part, error_text

_DELTA_KINDS = {
    "response.output_text.delta": KIND_TEXT,
    "response.reasoning_summary_text.delta": KIND_REASONING,
    "response.reasoning_text.delta": KIND_REASONING,
    "response.refusal.delta": KIND_REFUSAL,
    "response.function_call_arguments.delta": KIND_TOOL_CALL,
    "response.custom_tool_call_input.delta": KIND_TOOL_CALL,
    "response.mcp_call_arguments.delta": KIND_TOOL_CALL,
}
_TOOL_ITEMS = {"function_call", "custom_tool_call", "mcp_call"}
_FINAL = {"response.completed", "response.incomplete", "response.failed"}


class OpenAIResponsesDecoder(Decoder):
    provider = "openai-responses"

    def _decode(self, event: str, data: str) -> list[Part] | None:
        # The `.done` events repeat the whole text or item (the largest events of a stream) and in_progress
        # repeats `created`: skip them before parsing. Only possible when the event line names the type.
        if event.endswith(".done") or event == "response.in_progress":
            return None
        return super()._decode(event, data)

    def _handle(self, event: str, obj: dict) -> list[Part] | None:
        etype = obj.get("type") or event
        kind = _DELTA_KINDS.get(etype)
        if kind is not None:
            text = obj.get("delta")
            if not isinstance(text, str):
                return None
            if kind == KIND_TOOL_CALL:
                key = obj.get("item_id") or obj.get("output_index")
                return [(kind, text, (key, None, None))]
            return [(kind, text, None)]
        if etype == "response.output_item.added":
            item = obj.get("item") or {}
            if item.get("type") in _TOOL_ITEMS:
                key = item.get("id") or obj.get("output_index")
                # call_id is what the client sends back with the tool result: it is the call's id.
                ref = (key, item.get("call_id") or item.get("id"), item.get("name"))
                return [(KIND_TOOL_CALL, "", ref)]
            return None
        if etype == "response.created" or etype in _FINAL:
            self._response(etype, obj.get("response") or {})
            return None
        if etype == "error":
            self.error = error_text(obj)
            return None
        return None

    def _response(self, etype: str, resp: dict) -> None:
        self._set_model(resp.get("model"))
        usage = resp.get("usage")
        if usage:
            self._set_tokens(usage.get("input_tokens"), usage.get("output_tokens"))
        if etype == "response.created":
            return
        status = resp.get("status") or etype.rsplit(".", 1)[1]
        reason = (resp.get("incomplete_details") or {}).get("reason")
        # The API has no finish_reason: the final status stands in, or why the response is incomplete.
        self.stop_reason = reason or status
        if etype == "response.failed":
            err = resp.get("error")
            self.error = error_text(err) if err else "response.failed"
