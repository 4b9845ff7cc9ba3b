"""OpenAI Chat Completions (``chat.completion.chunk``) and every server that copies the format.

vLLM, llama.cpp server, SGLang, Ollama's ``/v1``, OpenRouter, Groq, Together, DeepSeek, Azure...: the same
decoder, with ``provider = 'openai-compatible'`` unless the host is api.openai.com. Legacy ``/v1/completions``
chunks (``choices[].text``) are decoded too.
"""

from __future__ import annotations

from typing import Any

from .base import (
    KIND_REASONING,
    KIND_REFUSAL,
    KIND_TEXT,
    KIND_TOOL_CALL,
    Decoder,
    Part,
    RequestInfo,
    json_args,
)


def _bare_host(host: str) -> str:
    host = host.lower().rstrip(".")
    if host.startswith("["):  # [::1]:8000
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_openai_host(host: str) -> bool:
    return _bare_host(host) == "api.openai.com"


class OpenAIChatDecoder(Decoder):
    def __init__(self, info: RequestInfo) -> None:
        super().__init__(info)
        self.provider = "openai" if is_openai_host(info.host) else "openai-compatible"
        self._seen_usage = False
        self._last_tool_key: Any = 0

    def _decode(self, event: str, data: str) -> list[Part] | None:
        if data == "[DONE]":  # the end marker is not JSON: skip the parse
            return None
        return super()._decode(event, data)

    def _handle(self, event: str, obj: dict) -> list[Part] | None:
        self._set_model(obj.get("model"))  # Azure's first chunk has model "": kept out
        self._set_error(obj.get("error"))
        usage = obj.get("usage")
        if not usage:
            groq = obj.get("x_groq")  # Groq puts usage in its own extension
            usage = groq.get("usage") if isinstance(groq, dict) else None
        if isinstance(usage, dict):
            self._usage(usage)
        elif not self._seen_usage:
            timings = obj.get("timings")
            if isinstance(timings, dict):
                # llama.cpp without usage: predicted_n is the generated-token count. Its prompt_n leaves
                # out cached prompt tokens, so it is not used as input_tokens.
                self._set_tokens(output_tokens=timings.get("predicted_n"))
        choices = obj.get("choices")
        if not choices:  # the usage chunk of stream_options.include_usage has choices: []
            return None
        # n > 1 interleaves choices: only choice 0 is decoded, so the text and tool calls stay coherent.
        choice = choices[0]
        if choice.get("index", 0) != 0:
            choice = next((c for c in choices if c.get("index", 0) == 0), None)
            if choice is None:
                return None
        finish = choice.get("finish_reason")
        if finish:
            self.stop_reason = finish
        delta = choice.get("delta")
        if delta is None:
            text = choice.get("text")  # legacy completions
            return [(KIND_TEXT, text, None)] if isinstance(text, str) and text else None
        if not delta:
            return None
        parts: list[Part] = []
        # vLLM and others have sent the same reasoning in both fields: take one, never both.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and isinstance(reasoning, str):
            parts.append((KIND_REASONING, reasoning, None))
        content = delta.get("content")
        if content and isinstance(content, str):
            parts.append((KIND_TEXT, content, None))
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            parts.append((KIND_REFUSAL, refusal, None))
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            for tc in tool_calls:
                parts.append(self._tool_part(tc))
        fc = delta.get("function_call")  # deprecated `functions` API: one call, no index
        if fc:
            parts.append(
                (KIND_TOOL_CALL, json_args(fc.get("arguments")), ("function_call", None, fc.get("name")))
            )
        return parts  # a role-only first delta gives [] -> not content

    def _tool_part(self, tc: dict) -> Part:
        fn = tc.get("function") or {}
        # Fragments of one call share its index; id and name come only with the first one. Some servers
        # omit the index (one whole call per chunk): fall back to the id, then to the previous call.
        key = tc.get("index")
        if key is None:
            key = tc.get("id") or self._last_tool_key
        self._last_tool_key = key
        return (
            KIND_TOOL_CALL,
            json_args(fn.get("arguments")),
            (key, tc.get("id") or None, fn.get("name") or None),
        )

    def _usage(self, usage: dict) -> None:
        self._seen_usage = True
        self._set_tokens(usage.get("prompt_tokens"), usage.get("completion_tokens"))
