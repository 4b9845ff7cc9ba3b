"""Provider decoders against streams written the way the real APIs send them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_sse.providers import (
    AnthropicDecoder,
    Delta,
    GeminiDecoder,
    GenericDecoder,
    OllamaDecoder,
    OpenAIChatDecoder,
    OpenAIResponsesDecoder,
    RequestInfo,
    SniffingDecoder,
    decoder_for,
    reconstruct,
)

SSE = "text/event-stream; charset=utf-8"


def info(host: str, path: str, *, query: str = "", ctype: str = SSE, req: dict | None = None) -> RequestInfo:
    return RequestInfo("POST", host, path, query, ctype, req)


def feed_all(dec, events):
    return [dec.feed(e, d) for e, d in events]


def content(deltas):
    return [(d.kind, d.text) for d in deltas if d is not None]


# ---------------------------------------------------------------- OpenAI Chat Completions


def chat_chunk(delta=None, finish=None, *, model="gpt-4o-2024-08-06", choices=True, usage=None, **extra):
    obj = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_f9f4fb6dbf",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
        if choices
        else [],
        "usage": usage,
    }
    obj.update(extra)
    return ("message", json.dumps(obj, separators=(",", ":")))


OPENAI_INFO = info("api.openai.com", "/v1/chat/completions", req={"model": "gpt-4o", "stream": True})

OPENAI_TEXT = [
    chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    chat_chunk({"content": "Hello"}),
    chat_chunk({"content": "!"}),
    chat_chunk({"content": " How can I help?"}),
    chat_chunk({}, "stop"),
    chat_chunk(
        choices=False,
        usage={
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    ),
    ("message", "[DONE]"),
]


def test_openai_chat_text_stream():
    dec = decoder_for(OPENAI_INFO)
    assert isinstance(dec, OpenAIChatDecoder)
    assert dec.provider == "openai"
    assert dec.model == "gpt-4o"  # from the request until the stream names it
    deltas = feed_all(dec, OPENAI_TEXT)
    assert deltas[0] is None  # role-only first delta is lifecycle, not content
    assert deltas[1] == Delta("Hello", "text")
    assert content(deltas) == [("text", "Hello"), ("text", "!"), ("text", " How can I help?")]
    assert deltas[-1] is None and deltas[-2] is None and deltas[-3] is None
    assert dec.n_content_events == 3
    assert (dec.model, dec.input_tokens, dec.output_tokens) == ("gpt-4o-2024-08-06", 19, 10)
    assert dec.stop_reason == "stop"
    assert dec.error is None


def test_openai_chat_no_usage_leaves_output_tokens_none():
    dec = decoder_for(OPENAI_INFO)
    feed_all(dec, OPENAI_TEXT[:5] + [("message", "[DONE]")])
    assert dec.output_tokens is None and dec.input_tokens is None


OPENAI_TOOLS = [
    chat_chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
            "refusal": None,
        }
    ),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"lo'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'cation": "Pa'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ris, France"}'}}]}),
    chat_chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        }
    ),
    chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": '}}]}),
    chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '"CET"}'}}]}),
    chat_chunk({}, "tool_calls"),
    ("message", "[DONE]"),
]


def test_openai_chat_tool_calls_split_over_deltas():
    dec = decoder_for(OPENAI_INFO)
    deltas = feed_all(dec, OPENAI_TOOLS)
    assert deltas[0] is None  # name only, empty arguments
    assert deltas[1] == Delta('{"lo', "tool_call")
    assert dec.n_content_events == 5
    rec = reconstruct(OPENAI_INFO, OPENAI_TOOLS)
    assert rec.text == ""
    assert rec.tool_calls == [
        {
            "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
            "name": "get_weather",
            "arguments": '{"location": "Paris, France"}',
        },
        {"id": "call_2", "name": "get_time", "arguments": '{"tz": "CET"}'},
    ]
    assert json.loads(rec.tool_calls[0]["arguments"]) == {"location": "Paris, France"}
    assert rec.stop_reason == "tool_calls"
    assert rec.n_content_events == 5


def test_openai_chat_refusal():
    events = [
        chat_chunk({"role": "assistant", "content": None, "refusal": ""}),
        chat_chunk({"refusal": "I'm sorry, "}),
        chat_chunk({"refusal": "I can't help with that."}),
        chat_chunk({}, "stop"),
        ("message", "[DONE]"),
    ]
    deltas = feed_all(decoder_for(OPENAI_INFO), events)
    assert content(deltas) == [("refusal", "I'm sorry, "), ("refusal", "I can't help with that.")]
    rec = reconstruct(OPENAI_INFO, events)
    assert (rec.refusal, rec.text) == ("I'm sorry, I can't help with that.", "")


def test_openai_chat_error_mid_stream():
    events = [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Par"}),
        (
            "message",
            '{"error":{"message":"The server had an error while processing your request.",'
            '"type":"server_error","param":null,"code":null}}',
        ),
    ]
    rec = reconstruct(OPENAI_INFO, events)
    assert rec.text == "Par"
    assert rec.error == "server_error: The server had an error while processing your request."


def test_deepseek_reasoning_content():
    inf = info("api.deepseek.com", "/chat/completions", req={"model": "deepseek-reasoner"})
    events = [
        chat_chunk(
            {"role": "assistant", "content": None, "reasoning_content": ""}, model="deepseek-reasoner"
        ),
        chat_chunk({"content": None, "reasoning_content": "The user"}, model="deepseek-reasoner"),
        chat_chunk({"content": None, "reasoning_content": " greets me."}, model="deepseek-reasoner"),
        chat_chunk({"content": "Hi", "reasoning_content": None}, model="deepseek-reasoner"),
        chat_chunk(
            {"content": "", "reasoning_content": None},
            "stop",
            model="deepseek-reasoner",
            usage={
                "prompt_tokens": 13,
                "completion_tokens": 40,
                "total_tokens": 53,
                "completion_tokens_details": {"reasoning_tokens": 38},
            },
        ),
        ("message", "[DONE]"),
    ]
    dec = decoder_for(inf)
    assert dec.provider == "openai-compatible"
    deltas = feed_all(dec, events)
    assert content(deltas) == [("reasoning", "The user"), ("reasoning", " greets me."), ("text", "Hi")]
    rec = reconstruct(inf, events)
    assert (rec.reasoning, rec.text) == ("The user greets me.", "Hi")
    assert (rec.input_tokens, rec.output_tokens, rec.stop_reason) == (13, 40, "stop")


def test_openrouter_reasoning_field_and_vllm_duplicate_fields():
    inf = info("openrouter.ai", "/api/v1/chat/completions", req={"model": "anthropic/claude-sonnet-4"})
    events = [
        chat_chunk(
            {"role": "assistant", "content": "", "reasoning": "Hmm"}, model="anthropic/claude-sonnet-4"
        ),
        # vLLM has sent the same reasoning under both names: it must not be doubled
        chat_chunk({"reasoning_content": " ok", "reasoning": " ok"}, model="anthropic/claude-sonnet-4"),
        chat_chunk({"content": "Yes"}, model="anthropic/claude-sonnet-4"),
    ]
    rec = reconstruct(inf, events)
    assert rec.provider == "openai-compatible"
    assert (rec.reasoning, rec.text) == ("Hmm ok", "Yes")


def test_llamacpp_timings_without_usage():
    inf = info("127.0.0.1:8080", "/v1/chat/completions")
    events = [
        chat_chunk({"role": "assistant", "content": None}, model="gpt-3.5-turbo"),
        chat_chunk({"content": "Hi"}, model="gpt-3.5-turbo"),
        chat_chunk(
            {},
            "stop",
            model="gpt-3.5-turbo",
            timings={"prompt_n": 5, "prompt_ms": 10.0, "predicted_n": 12, "predicted_ms": 90.1},
        ),
        ("message", "[DONE]"),
    ]
    rec = reconstruct(inf, events)
    assert (rec.provider, rec.output_tokens, rec.input_tokens) == ("openai-compatible", 12, None)


def test_groq_usage_in_x_groq():
    inf = info("api.groq.com", "/openai/v1/chat/completions")
    events = [
        chat_chunk({"role": "assistant", "content": ""}, model="llama-3.3-70b-versatile"),
        chat_chunk({"content": "Hi"}, model="llama-3.3-70b-versatile"),
        chat_chunk(
            {},
            "stop",
            model="llama-3.3-70b-versatile",
            x_groq={
                "id": "req_1",
                "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42},
            },
        ),
        ("message", "[DONE]"),
    ]
    rec = reconstruct(inf, events)
    assert (rec.input_tokens, rec.output_tokens, rec.model) == (40, 2, "llama-3.3-70b-versatile")


def test_azure_empty_first_chunk_keeps_request_model():
    inf = info("x.openai.azure.com", "/openai/deployments/d/chat/completions", req={"model": "gpt-4o"})
    first = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": []}
    dec = decoder_for(inf)
    assert dec.feed("message", json.dumps(first)) is None
    assert dec.model == "gpt-4o"


def test_openai_multiple_choices_only_choice_zero():
    def two(i, text):
        return (
            "message",
            json.dumps(
                {"object": "chat.completion.chunk", "choices": [{"index": i, "delta": {"content": text}}]}
            ),
        )

    rec = reconstruct(OPENAI_INFO, [two(0, "a"), two(1, "X"), two(0, "b"), two(1, "Y")])
    assert rec.text == "ab"


def test_legacy_completions_text():
    inf = info("localhost:8000", "/v1/completions")
    events = [
        (
            "message",
            json.dumps(
                {"object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "Once"}]}
            ),
        ),
        (
            "message",
            json.dumps(
                {
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": " upon", "finish_reason": "length"}],
                }
            ),
        ),
        ("message", "[DONE]"),
    ]
    rec = reconstruct(inf, events)
    assert (rec.text, rec.stop_reason, rec.model) == ("Once upon", "length", "m")


# ---------------------------------------------------------------- OpenAI Responses API


def rev(etype: str, **fields) -> tuple[str, str]:
    return (etype, json.dumps({"type": etype, **fields}))


def resp_obj(status: str, usage=None, **extra):
    return {
        "id": "resp_67ccd2bed1ec8190b14f964abc054267",
        "object": "response",
        "created_at": 1741476542,
        "status": status,
        "model": "gpt-4.1-2025-04-14",
        "output": [],
        "usage": usage,
        **extra,
    }


RESP_INFO = info("api.openai.com", "/v1/responses", req={"model": "gpt-4.1", "stream": True})
RESP_USAGE = {
    "input_tokens": 37,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 21,
    "output_tokens_details": {"reasoning_tokens": 8},
    "total_tokens": 58,
}
RESP_EVENTS = [
    rev("response.created", sequence_number=0, response=resp_obj("in_progress")),
    rev("response.in_progress", sequence_number=1, response=resp_obj("in_progress")),
    rev(
        "response.output_item.added",
        sequence_number=2,
        output_index=0,
        item={"id": "rs_1", "type": "reasoning", "summary": []},
    ),
    rev(
        "response.reasoning_summary_part.added",
        item_id="rs_1",
        output_index=0,
        summary_index=0,
        part={"type": "summary_text", "text": ""},
    ),
    rev(
        "response.reasoning_summary_text.delta",
        item_id="rs_1",
        output_index=0,
        summary_index=0,
        delta="**Weather**",
    ),
    rev(
        "response.reasoning_summary_text.delta",
        item_id="rs_1",
        output_index=0,
        summary_index=0,
        delta=" lookup",
    ),
    rev(
        "response.reasoning_summary_text.done",
        item_id="rs_1",
        output_index=0,
        summary_index=0,
        text="**Weather** lookup",
    ),
    rev(
        "response.output_item.added",
        output_index=1,
        item={"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"},
    ),
    rev(
        "response.content_part.added",
        item_id="msg_1",
        output_index=1,
        content_index=0,
        part={"type": "output_text", "text": "", "annotations": []},
    ),
    rev(
        "response.output_text.delta",
        item_id="msg_1",
        output_index=1,
        content_index=0,
        delta="Let me",
        logprobs=[],
    ),
    rev(
        "response.output_text.delta",
        item_id="msg_1",
        output_index=1,
        content_index=0,
        delta=" check.",
        logprobs=[],
    ),
    rev("response.output_text.done", item_id="msg_1", output_index=1, content_index=0, text="Let me check."),
    rev(
        "response.output_item.added",
        output_index=2,
        item={
            "id": "fc_1",
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": "call_xyz",
            "name": "get_weather",
        },
    ),
    rev("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta='{"city":'),
    rev("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta=' "Oslo"}'),
    rev(
        "response.function_call_arguments.done", item_id="fc_1", output_index=2, arguments='{"city": "Oslo"}'
    ),
    rev("response.completed", response=resp_obj("completed", RESP_USAGE)),
]


def test_responses_stream():
    dec = decoder_for(RESP_INFO)
    assert isinstance(dec, OpenAIResponsesDecoder)
    assert dec.provider == "openai-responses"
    deltas = feed_all(dec, RESP_EVENTS)
    assert deltas[:4] == [None] * 4  # created, in_progress, item/part added: lifecycle
    assert content(deltas) == [
        ("reasoning", "**Weather**"),
        ("reasoning", " lookup"),
        ("text", "Let me"),
        ("text", " check."),
        ("tool_call", '{"city":'),
        ("tool_call", ' "Oslo"}'),
    ]
    assert (dec.model, dec.input_tokens, dec.output_tokens, dec.stop_reason) == (
        "gpt-4.1-2025-04-14",
        37,
        21,
        "completed",
    )
    rec = reconstruct(RESP_INFO, RESP_EVENTS)
    assert (rec.text, rec.reasoning) == ("Let me check.", "**Weather** lookup")
    assert rec.tool_calls == [{"id": "call_xyz", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert rec.error is None


def test_responses_model_from_created_before_completion():
    dec = decoder_for(RESP_INFO)
    dec.feed(*RESP_EVENTS[0])
    assert dec.model == "gpt-4.1-2025-04-14"


def test_responses_refusal_and_incomplete():
    events = [
        rev("response.created", response=resp_obj("in_progress")),
        rev("response.refusal.delta", item_id="msg_1", output_index=0, content_index=0, delta="I can't"),
        rev(
            "response.incomplete",
            response=resp_obj("incomplete", RESP_USAGE, incomplete_details={"reason": "max_output_tokens"}),
        ),
    ]
    rec = reconstruct(RESP_INFO, events)
    assert rec.refusal == "I can't"
    assert rec.stop_reason == "max_output_tokens"


def test_responses_failed_and_error_events():
    failed = [
        rev("response.created", response=resp_obj("in_progress")),
        rev("response.output_text.delta", item_id="m", output_index=0, content_index=0, delta="Hi"),
        rev(
            "response.failed",
            response=resp_obj(
                "failed",
                error={"code": "server_error", "message": "The model failed to generate a response."},
            ),
        ),
    ]
    rec = reconstruct(RESP_INFO, failed)
    assert rec.error == "server_error: The model failed to generate a response."
    assert (rec.stop_reason, rec.text) == ("failed", "Hi")
    err = [rev("error", code="ERR_SOMETHING", message="Something went wrong", param=None, sequence_number=1)]
    assert reconstruct(RESP_INFO, err).error == "ERR_SOMETHING: Something went wrong"


def test_responses_without_event_lines():
    # A proxy that drops `event:` lines: the type inside the data still decodes it.
    events = [("message", d) for _, d in RESP_EVENTS]
    rec = reconstruct(RESP_INFO, events)
    assert rec.text == "Let me check."
    assert rec.tool_calls[0]["arguments"] == '{"city": "Oslo"}'


# ---------------------------------------------------------------- Anthropic Messages


def aev(etype: str, **fields) -> tuple[str, str]:
    return (etype, json.dumps({"type": etype, **fields}))


ANTHROPIC_INFO = info("api.anthropic.com", "/v1/messages", req={"model": "claude-sonnet-4-5", "stream": True})
ANTHROPIC_EVENTS = [
    aev(
        "message_start",
        message={
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 472,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 2,
            },
        },
    ),
    aev("content_block_start", index=0, content_block={"type": "thinking", "thinking": "", "signature": ""}),
    ("ping", '{"type": "ping"}'),
    aev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "User wants"}),
    aev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": " the weather."}),
    aev(
        "content_block_delta",
        index=0,
        delta={"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
    ),
    aev("content_block_stop", index=0),
    aev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    aev("content_block_delta", index=1, delta={"type": "text_delta", "text": "Okay, let's check"}),
    aev("content_block_delta", index=1, delta={"type": "text_delta", "text": " the weather."}),
    aev("content_block_stop", index=1),
    aev(
        "content_block_start",
        index=2,
        content_block={
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    ),
    aev("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": ""}),
    aev("content_block_delta", index=2, delta={"type": "input_json_delta", "partial_json": '{"location":'}),
    aev(
        "content_block_delta",
        index=2,
        delta={"type": "input_json_delta", "partial_json": ' "San Francisco, CA"}'},
    ),
    aev("content_block_stop", index=2),
    aev(
        "message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None}, usage={"output_tokens": 89}
    ),
    aev("message_stop"),
]


def test_anthropic_stream():
    dec = decoder_for(ANTHROPIC_INFO)
    assert isinstance(dec, AnthropicDecoder)
    assert dec.model == "claude-sonnet-4-5"
    deltas = feed_all(dec, ANTHROPIC_EVENTS)
    assert deltas[0] is None and deltas[1] is None and deltas[2] is None  # message_start, empty block, ping
    assert deltas[5] is None  # signature_delta
    assert content(deltas) == [
        ("reasoning", "User wants"),
        ("reasoning", " the weather."),
        ("text", "Okay, let's check"),
        ("text", " the weather."),
        ("tool_call", '{"location":'),
        ("tool_call", ' "San Francisco, CA"}'),
    ]
    assert dec.model == "claude-sonnet-4-5-20250929"
    assert (dec.input_tokens, dec.output_tokens, dec.stop_reason, dec.error) == (472, 89, "tool_use", None)
    rec = reconstruct(ANTHROPIC_INFO, ANTHROPIC_EVENTS)
    assert rec.provider == "anthropic"
    assert (rec.text, rec.reasoning) == ("Okay, let's check the weather.", "User wants the weather.")
    assert rec.tool_calls == [
        {
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "arguments": '{"location": "San Francisco, CA"}',
        }
    ]


def test_anthropic_output_tokens_only_from_message_delta():
    dec = decoder_for(ANTHROPIC_INFO)
    dec.feed(*ANTHROPIC_EVENTS[0])
    assert (dec.input_tokens, dec.output_tokens) == (472, None)


def test_anthropic_error_event():
    events = [
        ANTHROPIC_EVENTS[0],
        aev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        aev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hel"}),
        ("error", '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'),
    ]
    rec = reconstruct(ANTHROPIC_INFO, events)
    assert rec.error == "overloaded_error: Overloaded"
    assert rec.text == "Hel"


def test_anthropic_tool_without_arguments_still_reconstructed():
    events = [
        aev(
            "content_block_start",
            index=0,
            content_block={"type": "tool_use", "id": "toolu_9", "name": "now", "input": {}},
        ),
        aev("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": ""}),
        aev("content_block_stop", index=0),
    ]
    rec = reconstruct(ANTHROPIC_INFO, events)
    assert rec.tool_calls == [{"id": "toolu_9", "name": "now", "arguments": ""}]
    assert rec.n_content_events == 0


# ---------------------------------------------------------------- Gemini


def gem(parts, *, finish=None, usage=None, model="gemini-2.5-flash"):
    cand = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    obj = {"candidates": [cand], "usageMetadata": usage or {"promptTokenCount": 9, "totalTokenCount": 9}}
    if model:
        obj["modelVersion"] = model
    obj["responseId"] = "mHzAaN_8NIWsz7IPu4fK4QM"
    return ("message", json.dumps(obj))


GEMINI_INFO = info(
    "generativelanguage.googleapis.com",
    "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    query="alt=sse",
)
GEMINI_EVENTS = [
    gem(
        [{"text": "**Planning the reply**\n\n", "thought": True}],
        usage={"promptTokenCount": 9, "thoughtsTokenCount": 30},
    ),
    gem([{"text": "Hello"}]),
    gem([{"text": " there!"}]),
    gem(
        [{"text": ""}],
        finish="STOP",
        usage={
            "promptTokenCount": 9,
            "candidatesTokenCount": 3,
            "totalTokenCount": 42,
            "thoughtsTokenCount": 30,
        },
    ),
]


def test_gemini_stream():
    dec = decoder_for(GEMINI_INFO)
    assert isinstance(dec, GeminiDecoder)
    assert dec.model == "gemini-2.5-flash"  # from the URL before any event
    deltas = feed_all(dec, GEMINI_EVENTS)
    assert content(deltas) == [
        ("reasoning", "**Planning the reply**\n\n"),
        ("text", "Hello"),
        ("text", " there!"),
    ]
    assert deltas[-1] is None
    assert (dec.input_tokens, dec.output_tokens, dec.stop_reason) == (9, 33, "STOP")


def test_gemini_function_call_and_mixed_parts():
    events = [
        gem([{"text": "thinking", "thought": True}, {"text": "Checking."}]),
        gem(
            [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "CiQBVKhc7",
                },
                {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
            ],
            finish="STOP",
        ),
    ]
    dec = decoder_for(GEMINI_INFO)
    d0, d1 = feed_all(dec, events)
    assert d0 == Delta("Checking.", "text")  # one Delta per event: the answer text wins over the thought
    assert d1.kind == "tool_call"
    rec = reconstruct(GEMINI_INFO, events)
    assert (rec.reasoning, rec.text) == ("thinking", "Checking.")
    assert rec.tool_calls == [
        {"id": None, "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": None, "name": "get_time", "arguments": '{"tz": "CET"}'},
    ]


def test_gemini_model_from_url_vertex_and_error():
    inf = info(
        "us-central1-aiplatform.googleapis.com",
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent",
        query="alt=sse",
    )
    events = [
        gem([{"text": "Hi"}], model=None),
        (
            "message",
            '{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}',
        ),
    ]
    rec = reconstruct(inf, events)
    assert rec.model == "gemini-2.0-flash-001"
    assert rec.error == "UNAVAILABLE: The model is overloaded."


def test_gemini_blocked_prompt():
    ev = (
        "message",
        json.dumps({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}}),
    )
    rec = reconstruct(GEMINI_INFO, [ev])
    assert (rec.stop_reason, rec.text, rec.input_tokens) == ("SAFETY", "", 4)


# ---------------------------------------------------------------- Ollama NDJSON

NDJSON = "application/x-ndjson"


def oline(**fields) -> tuple[str, str]:
    return ("message", json.dumps({"model": "qwen3:8b", "created_at": "2025-06-01T10:00:00.123Z", **fields}))


OLLAMA_CHAT = info("localhost:11434", "/api/chat", ctype=NDJSON, req={"model": "qwen3", "stream": True})
OLLAMA_EVENTS = [
    oline(message={"role": "assistant", "content": "", "thinking": "Okay, the user"}, done=False),
    oline(message={"role": "assistant", "content": "", "thinking": " asks about Tokyo."}, done=False),
    oline(
        message={
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}],
        },
        done=False,
    ),
    oline(message={"role": "assistant", "content": "Checking"}, done=False),
    oline(message={"role": "assistant", "content": " now."}, done=False),
    oline(
        message={"role": "assistant", "content": ""},
        done_reason="stop",
        done=True,
        total_duration=4883583458,
        load_duration=1334875,
        prompt_eval_count=26,
        prompt_eval_duration=342546000,
        eval_count=282,
        eval_duration=4535599000,
    ),
]


def test_ollama_chat():
    dec = decoder_for(OLLAMA_CHAT)
    assert isinstance(dec, OllamaDecoder)
    deltas = feed_all(dec, OLLAMA_EVENTS)
    assert [d.kind if d else None for d in deltas] == [
        "reasoning",
        "reasoning",
        "tool_call",
        "text",
        "text",
        None,
    ]
    assert (dec.model, dec.input_tokens, dec.output_tokens, dec.stop_reason) == ("qwen3:8b", 26, 282, "stop")
    rec = reconstruct(OLLAMA_CHAT, OLLAMA_EVENTS)
    assert (rec.text, rec.reasoning) == ("Checking now.", "Okay, the user asks about Tokyo.")
    assert rec.tool_calls == [{"id": None, "name": "get_weather", "arguments": '{"city": "Tokyo"}'}]


def test_ollama_generate_and_error():
    inf = info("localhost:11434", "/api/generate", ctype=NDJSON)
    events = [
        oline(response="The", done=False),
        oline(response=" sky", done=False),
        oline(
            response="", done=True, done_reason="length", context=[1, 2, 3], prompt_eval_count=5, eval_count=2
        ),
    ]
    rec = reconstruct(inf, events)
    assert (rec.text, rec.output_tokens, rec.stop_reason) == ("The sky", 2, "length")
    assert reconstruct(
        inf, [("message", '{"error":"model \\"nope\\" not found, try pulling it first"}')]
    ).error == ('model "nope" not found, try pulling it first')


# ---------------------------------------------------------------- generic fallback and sniffing


def test_generic_tgi():
    inf = info("tgi.internal:8080", "/generate_stream", req={"inputs": "Hi", "parameters": {}})

    def tok(i, text, special=False, generated=None, details=None):
        return (
            "message",
            json.dumps(
                {
                    "index": i,
                    "token": {"id": i, "text": text, "logprob": -0.1, "special": special},
                    "top_tokens": None,
                    "generated_text": generated,
                    "details": details,
                }
            ),
        )

    events = [
        tok(1, "Hello"),
        tok(2, " world"),
        tok(
            3,
            "</s>",
            special=True,
            generated="Hello world",
            details={"finish_reason": "eos_token", "generated_tokens": 3, "seed": None},
        ),
    ]
    dec = decoder_for(inf)
    assert dec.provider == "generic"
    deltas = feed_all(dec, events)
    assert content(deltas) == [("text", "Hello"), ("text", " world")]
    assert (dec.output_tokens, dec.stop_reason) == (3, "eos_token")


@pytest.mark.parametrize(
    "data, expected",
    [
        ('{"text": "a"}', Delta("a", "text")),
        ('{"content": "b"}', Delta("b", "text")),
        ('{"type": "text-delta", "id": "0", "delta": "c"}', Delta("c", "text")),
        ('{"type": "reasoning-delta", "id": "0", "delta": "r"}', Delta("r", "reasoning")),
        ('{"delta": {"nested": 1}}', None),
        ('{"text": ""}', None),
        ("plain words", None),
        ('"a json string"', None),
        ("[DONE]", None),
        ("", None),
    ],
)
def test_generic_fields(data, expected):
    dec = GenericDecoder(info("example.com", "/stream"))
    assert dec.feed("message", data) == expected


@pytest.mark.parametrize(
    "events, provider, text",
    [
        ([chat_chunk({"role": "assistant"}), chat_chunk({"content": "x"})], "openai-compatible", "x"),
        (ANTHROPIC_EVENTS, "anthropic", "Okay, let's check the weather."),
        ([("message", d) for _, d in RESP_EVENTS], "openai-responses", "Let me check."),
        (GEMINI_EVENTS, "gemini", "Hello there!"),
        (OLLAMA_EVENTS, "ollama", "Checking now."),
    ],
)
def test_sniffing_unknown_route(events, provider, text):
    inf = info("gateway.corp.example", "/llm/stream", ctype="text/event-stream", req={"model": "m"})
    dec = decoder_for(inf)
    assert isinstance(dec, SniffingDecoder) and dec.provider == "generic"
    rec = reconstruct(inf, events)
    assert (rec.provider, rec.text) == (provider, text)
    assert rec.model is not None


def test_sniffed_decoder_exposes_metadata():
    inf = info("gateway.corp.example", "/llm/stream")
    dec = decoder_for(inf)
    feed_all(dec, ANTHROPIC_EVENTS)
    assert (dec.provider, dec.model, dec.input_tokens, dec.output_tokens) == (
        "anthropic",
        "claude-sonnet-4-5-20250929",
        472,
        89,
    )
    assert dec.n_content_events == 6


@pytest.mark.parametrize(
    "host, path, ctype, cls",
    [
        ("api.openai.com", "/v1/chat/completions", SSE, OpenAIChatDecoder),
        ("localhost:8000", "/v1/completions", SSE, OpenAIChatDecoder),
        ("localhost:11434", "/v1/chat/completions", SSE, OpenAIChatDecoder),
        ("api.openai.com", "/v1/responses", SSE, OpenAIResponsesDecoder),
        ("api.anthropic.com", "/v1/messages", SSE, AnthropicDecoder),
        ("api.deepseek.com", "/anthropic/v1/messages", SSE, AnthropicDecoder),
        (
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
            SSE,
            GeminiDecoder,
        ),
        ("localhost:11434", "/api/chat", NDJSON, OllamaDecoder),
        ("localhost:11434", "/api/generate", "application/x-ndjson", OllamaDecoder),
        ("myapp.example", "/api/chat", SSE, SniffingDecoder),  # a web app's own SSE route, not Ollama
        ("example.com", "/events", SSE, SniffingDecoder),
    ],
)
def test_decoder_for_routes(host, path, ctype, cls):
    assert type(decoder_for(info(host, path, ctype=ctype))) is cls


def test_openai_provider_name_by_host():
    assert decoder_for(info("api.openai.com:443", "/v1/chat/completions")).provider == "openai"
    assert decoder_for(info("API.OPENAI.COM", "/v1/chat/completions")).provider == "openai"
    assert decoder_for(info("api.together.xyz", "/v1/chat/completions")).provider == "openai-compatible"


# ---------------------------------------------------------------- robustness

ALL_DECODERS = [
    OpenAIChatDecoder,
    OpenAIResponsesDecoder,
    AnthropicDecoder,
    GeminiDecoder,
    OllamaDecoder,
    GenericDecoder,
    SniffingDecoder,
]
EVENT_NAMES = st.sampled_from(
    [
        "message",
        "error",
        "message_start",
        "content_block_start",
        "content_block_delta",
        "message_delta",
        "response.created",
        "response.output_text.delta",
        "response.output_item.added",
        "response.completed",
        "response.failed",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Real keys at random places, so the fuzz reaches past the first isinstance check.
KEYS = st.sampled_from(
    [
        "choices", "delta", "content", "tool_calls", "function", "arguments", "index", "usage", "error",
        "type", "message", "candidates", "parts", "text", "functionCall", "response", "item", "done",
        "model", "token", "details", "x_groq", "timings", "content_block", "usageMetadata", "thought",
    ]
)  # fmt: skip
SHAPED = st.recursive(
    st.none() | st.integers() | st.text(max_size=5) | st.booleans(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
FAST = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("cls", ALL_DECODERS)
@FAST
@given(event=st.text(max_size=20) | EVENT_NAMES, data=st.text())
def test_feed_never_raises_on_text(cls, event, data):
    dec = cls(info("h", "/p"))
    result = dec.feed(event, data)
    assert result is None or isinstance(result, Delta)


@pytest.mark.parametrize("cls", ALL_DECODERS)
@FAST
@given(event=EVENT_NAMES, value=SHAPED | JSON_VALUES)
def test_feed_never_raises_on_json(cls, event, value):
    dec = cls(info("h", "/p"))
    result = dec.feed(event, json.dumps(value))
    assert result is None or (isinstance(result, Delta) and result.text)
    rec = reconstruct(info("h", "/p"), [(event, json.dumps(value))])
    assert isinstance(rec.text, str)


def test_feed_does_not_accumulate_text():
    dec = decoder_for(OPENAI_INFO)
    ev = chat_chunk({"content": "token "})
    for _ in range(5000):
        dec.feed(*ev)
    assert dec.n_content_events == 5000
    held = [v for v in vars(dec).values() if isinstance(v, str | list | dict) and len(v) > 200]
    assert held == []


@pytest.mark.parametrize(
    "inf, events",
    [
        (OPENAI_INFO, OPENAI_TEXT + OPENAI_TOOLS),
        (RESP_INFO, RESP_EVENTS),
        (ANTHROPIC_INFO, ANTHROPIC_EVENTS),
        (GEMINI_INFO, GEMINI_EVENTS),
        (OLLAMA_CHAT, OLLAMA_EVENTS),
    ],
)
def test_feed_and_reconstruct_agree(inf, events):
    deltas = [d for d in feed_all(decoder_for(inf), events) if d]
    rec = reconstruct(inf, events)
    assert "".join(d.text for d in deltas if d.kind == "text") == rec.text
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == rec.reasoning
    assert "".join(d.text for d in deltas if d.kind == "tool_call") == "".join(
        t["arguments"] for t in rec.tool_calls
    )
    assert rec.n_content_events == len(deltas)
