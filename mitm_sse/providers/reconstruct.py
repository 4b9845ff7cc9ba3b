"""Full replay of one stream's events into text, reasoning, refusal and tool calls."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import KIND_REASONING, KIND_REFUSAL, KIND_TEXT, KIND_TOOL_CALL, Reconstruction, RequestInfo
from .dispatch import decoder_for


def reconstruct(info: RequestInfo, events: Iterable[tuple[str, str]]) -> Reconstruction:
    dec = decoder_for(info)
    buf: dict[str, list[str]] = {KIND_TEXT: [], KIND_REASONING: [], KIND_REFUSAL: []}
    tools: dict[Any, dict[str, Any]] = {}  # key -> {'id', 'name', 'arguments': [fragments]}, first-seen order
    for event, data in events:
        for kind, text, tool in dec.parts(event, data):
            if kind == KIND_TOOL_CALL:
                key, tid, name = tool if tool is not None else (None, None, None)
                entry = tools.get(key)
                if entry is None:
                    entry = tools[key] = {"id": None, "name": None, "arguments": []}
                if tid:
                    entry["id"] = tid
                if name:
                    entry["name"] = name
                if text:
                    entry["arguments"].append(text)
            elif text:
                buf[kind].append(text)
    return Reconstruction(
        provider=dec.provider,
        model=dec.model,
        text="".join(buf[KIND_TEXT]),
        reasoning="".join(buf[KIND_REASONING]),
        refusal="".join(buf[KIND_REFUSAL]),
        tool_calls=[
            {"id": t["id"], "name": t["name"], "arguments": "".join(t["arguments"])} for t in tools.values()
        ],
        input_tokens=dec.input_tokens,
        output_tokens=dec.output_tokens,
        stop_reason=dec.stop_reason,
        error=dec.error,
        n_content_events=dec.n_content_events,
    )
