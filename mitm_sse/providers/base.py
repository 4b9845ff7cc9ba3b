"""Shared types and the ``Decoder`` base class.

A decoder turns one dispatched SSE event (or one NDJSON line) into at most one ``Delta``. It keeps only
metadata (model, token counts, stop reason, error, a content-event counter): the writer feeds it streams of
millions of events, so the generated text itself is never accumulated here (``reconstruct`` does that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KIND_TEXT = "text"
KIND_REASONING = "reasoning"
KIND_TOOL_CALL = "tool_call"
KIND_REFUSAL = "refusal"

# When one event carries several kinds (a Gemini chunk with a thought part and a text part), the single
# Delta keeps the most user-visible kind, so that ``content_kind = 'text'`` rows still rebuild the answer.
_KIND_PRIORITY = {KIND_TEXT: 0, KIND_TOOL_CALL: 1, KIND_REFUSAL: 2, KIND_REASONING: 3}

# A part is (kind, text, tool). ``tool`` is None, or (key, id, name) for tool calls: ``key`` groups the
# argument fragments of one call (OpenAI's tool-call index, Anthropic's block index, ...); id and name are
# None when this fragment does not carry them. A tool part with empty text only announces a call.
ToolRef = tuple[Any, str | None, str | None]
Part = tuple[str, str, ToolRef | None]

loads = json.loads


@dataclass(frozen=True)
class RequestInfo:
    method: str
    host: str
    path: str
    query: str = ""
    content_type: str = ""
    request_json: dict | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    kind: str  # 'text' | 'reasoning' | 'tool_call' | 'refusal'


@dataclass
class Reconstruction:
    provider: str
    model: str | None
    text: str = ""
    reasoning: str = ""
    refusal: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    stop_reason: str | None = None
    error: str | None = None
    n_content_events: int = 0


def request_model(info: RequestInfo) -> str | None:
    """The model named in the request body, if any (the stream's own value wins once it arrives)."""
    req = info.request_json
    if isinstance(req, dict):
        model = req.get("model")
        if isinstance(model, str) and model:
            return model
    return None


def as_int(value: Any) -> int | None:
    # bool is an int subclass: a stray `true` must not become a token count of 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def error_text(err: Any) -> str:
    """One readable line from the error shapes the providers send.

    OpenAI ``{"message", "type", "code"}``, Anthropic ``{"type", "message"}``, Gemini ``{"code", "message",
    "status"}``, Ollama a bare string, sometimes nested one level (``{"error": {...}}``).
    """
    if isinstance(err, str):
        return err
    if isinstance(err, dict):
        inner = err.get("error")
        if isinstance(inner, dict | str) and not err.get("message"):
            return error_text(inner)
        msg = err.get("message")
        label = err.get("status") or err.get("type") or err.get("code")
        if label == "error":  # Responses API: {"type": "error", "code": ..., "message": ...}
            label = err.get("code")
        if msg and label:
            return f"{label}: {msg}"
        if msg or label:
            return str(msg or label)
    try:
        return json.dumps(err, ensure_ascii=False)
    except Exception:
        return repr(err)


def json_args(args: Any) -> str:
    """Tool arguments as a JSON string (Gemini and Ollama send objects, OpenAI a string)."""
    if isinstance(args, str):
        return args
    if args is None:
        return ""
    return json.dumps(args, ensure_ascii=False)


class Decoder:
    """Base decoder. Subclasses implement ``_handle`` (one parsed JSON object) or ``_decode`` (the raw event)
    and set the metadata attributes as they go."""

    provider: str = "generic"

    def __init__(self, info: RequestInfo) -> None:
        self.info = info
        self.model: str | None = request_model(info)
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.n_content_events = 0

    def _decode(self, event: str, data: str) -> list[Part] | None:
        """Parse the data as JSON; an object goes to ``_handle``, anything else is not content."""
        obj = loads(data)
        if not isinstance(obj, dict):
            return None
        return self._handle(event, obj)

    def _handle(self, event: str, obj: dict) -> list[Part] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_model(self, model: Any) -> None:
        """Keep a non-empty model name the stream reports."""
        if model and isinstance(model, str):
            self.model = model

    def _set_error(self, err: Any) -> None:
        if err:
            self.error = error_text(err)

    def _set_tokens(self, input_tokens: Any = None, output_tokens: Any = None) -> None:
        """Keep each count that is an integer; a missing or malformed one leaves the current value."""
        n = as_int(input_tokens)
        if n is not None:
            self.input_tokens = n
        n = as_int(output_tokens)
        if n is not None:
            self.output_tokens = n

    def feed(self, event: str, data: str) -> Delta | None:
        """Decode one event. Never raises: anything malformed is simply not content."""
        try:
            parts = self._decode(event, data)
            if not parts:
                return None
            return self._merge(parts)
        except Exception:
            return None

    def parts(self, event: str, data: str) -> list[Part]:
        """Like ``feed`` but returns every part (for ``reconstruct``); counts content events the same way."""
        try:
            parts = self._decode(event, data)
            if not parts:
                return []
            self._merge(parts)
            return parts
        except Exception:
            return []

    def _merge(self, parts: list[Part]) -> Delta | None:
        if len(parts) == 1:  # the hot path: one part per event
            kind, text, _ = parts[0]
            if not text:
                return None
            self.n_content_events += 1
            return Delta(text, kind)
        kind = None
        for k, t, _ in parts:
            if t and (kind is None or _KIND_PRIORITY[k] < _KIND_PRIORITY[kind]):
                kind = k
        if kind is None:
            return None
        self.n_content_events += 1
        return Delta("".join(t for k, t, _ in parts if k == kind), kind)
