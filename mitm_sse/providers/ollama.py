"""Ollama native NDJSON (``/api/chat``, ``/api/generate``): one JSON object per line, ``done: true`` last."""

from __future__ import annotations

from .base import KIND_REASONING, KIND_TEXT, KIND_TOOL_CALL, Decoder, Part, RequestInfo, json_args


class OllamaDecoder(Decoder):
    provider = "ollama"

    def __init__(self, info: RequestInfo) -> None:
        super().__init__(info)
        self._n_calls = 0  # tool calls arrive whole and unnumbered: number them for the reconstruction

    def _handle(self, event: str, obj: dict) -> list[Part] | None:
        self._set_model(obj.get("model"))
        self._set_error(obj.get("error"))
        if obj.get("done"):
            self._set_tokens(obj.get("prompt_eval_count"), obj.get("eval_count"))
            reason = obj.get("done_reason")
            if reason:
                self.stop_reason = reason
        msg = obj.get("message")
        if isinstance(msg, dict):  # /api/chat
            thinking, content, calls = msg.get("thinking"), msg.get("content"), msg.get("tool_calls")
        else:  # /api/generate
            thinking, content, calls = obj.get("thinking"), obj.get("response"), None
        out: list[Part] = []
        if thinking and isinstance(thinking, str):
            out.append((KIND_REASONING, thinking, None))
        if content and isinstance(content, str):
            out.append((KIND_TEXT, content, None))
        if calls:
            for call in calls:
                fn = call.get("function") or {}
                key = self._n_calls
                self._n_calls += 1
                out.append(
                    (KIND_TOOL_CALL, json_args(fn.get("arguments")), (key, call.get("id"), fn.get("name")))
                )
        return out
