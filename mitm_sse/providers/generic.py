"""Fallback for SSE from unknown servers: common JSON text fields, else nothing."""

from __future__ import annotations

from .base import KIND_REASONING, KIND_TEXT, Decoder, Part


class GenericDecoder(Decoder):
    """Plain-text data fails the JSON parse of ``Decoder._decode`` and is not content: a guess would be
    wrong too often."""

    provider = "generic"

    def _handle(self, event: str, obj: dict) -> list[Part] | None:
        self._set_model(obj.get("model"))
        self._set_error(obj.get("error"))
        self._meta(obj)
        token = obj.get("token")
        if isinstance(token, dict):
            # Hugging Face TGI: token.text per event. Special tokens (</s>) are not generated text, and the
            # final event's generated_text repeats the whole answer.
            text = token.get("text")
            if isinstance(text, str) and text and not token.get("special"):
                return [(KIND_TEXT, text, None)]
            return None
        for name in ("delta", "text", "content"):
            text = obj.get(name)
            if isinstance(text, str):
                if not text:
                    return None
                # Vercel AI SDK UI streams: {"type": "reasoning-delta", "delta": ...} beside "text-delta".
                etype = obj.get("type")
                kind = (
                    KIND_REASONING if isinstance(etype, str) and etype.startswith("reasoning") else KIND_TEXT
                )
                return [(kind, text, None)]
        return None

    def _meta(self, obj: dict) -> None:
        details = obj.get("details")  # TGI's last event
        if isinstance(details, dict):
            self._set_tokens(output_tokens=details.get("generated_tokens"))
            if details.get("finish_reason"):
                self.stop_reason = str(details["finish_reason"])
        finish = obj.get("finish_reason") or obj.get("stop_reason")
        if finish and isinstance(finish, str):
            self.stop_reason = finish
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._set_tokens(
                usage.get("input_tokens", usage.get("prompt_tokens")),
                usage.get("output_tokens", usage.get("completion_tokens")),
            )
