"""Google Gemini ``:streamGenerateContent?alt=sse`` (AI Studio and Vertex AI)."""

from __future__ import annotations

from .base import (
    KIND_REASONING,
    KIND_TEXT,
    KIND_TOOL_CALL,
    Decoder,
    Part,
    RequestInfo,
    as_int,
    json_args,
    loads,
)


def model_from_path(path: str) -> str | None:
    """``/v1beta/models/gemini-2.5-flash:streamGenerateContent`` -> ``gemini-2.5-flash`` (Vertex paths too)."""
    i = path.rfind("/models/")
    if i < 0:
        return None
    name = path[i + 8 :].split(":", 1)[0].split("/", 1)[0]
    return name or None


class GeminiDecoder(Decoder):
    provider = "gemini"

    def __init__(self, info: RequestInfo) -> None:
        super().__init__(info)
        if self.model is None:  # the request body of generateContent has no model field: the URL names it
            self.model = model_from_path(info.path)
        # Gemini sends each functionCall whole, with no index: number them to key the reconstruction.
        self._n_calls = 0

    def _decode(self, event: str, data: str) -> list[Part] | None:
        obj = loads(data)
        if isinstance(obj, list):  # without alt=sse the body is one JSON array; tolerate it per event
            parts: list[Part] = []
            for item in obj:
                if isinstance(item, dict):
                    parts.extend(self._handle(event, item) or ())
            return parts
        if not isinstance(obj, dict):
            return None
        return self._handle(event, obj)

    def _handle(self, event: str, obj: dict) -> list[Part] | None:
        self._set_model(obj.get("modelVersion"))
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage(usage)
        self._set_error(obj.get("error"))
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.stop_reason = feedback["blockReason"]  # blocked prompt: no candidates at all
        candidates = obj.get("candidates")
        if not candidates:
            return None
        cand = candidates[0]
        finish = cand.get("finishReason")
        if finish:
            self.stop_reason = finish
        content = cand.get("content")
        if not content:
            return None
        out: list[Part] = []
        for part in content.get("parts") or ():
            text = part.get("text")
            if isinstance(text, str):
                if text:
                    out.append((KIND_REASONING if part.get("thought") else KIND_TEXT, text, None))
                continue
            call = part.get("functionCall")
            if isinstance(call, dict):
                key = self._n_calls
                self._n_calls += 1
                out.append(
                    (KIND_TOOL_CALL, json_args(call.get("args", {})), (key, call.get("id"), call.get("name")))
                )
            # inlineData, executableCode, codeExecutionResult, bare thoughtSignature: not text content.
        return out

    def _usage(self, usage: dict) -> None:
        self._set_tokens(usage.get("promptTokenCount"))
        cands = as_int(usage.get("candidatesTokenCount"))
        thoughts = as_int(usage.get("thoughtsTokenCount"))
        # Thinking tokens are generated (and their events count as content): include them.
        if cands is not None or thoughts is not None:
            self.output_tokens = (cands or 0) + (thoughts or 0)
