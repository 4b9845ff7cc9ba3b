"""Provider decoders: find the generated content and the usage metadata in LLM streaming responses.

Pure Python, no I/O. ``decoder_for(info).feed(event, data)`` per dispatched event (the writer thread);
``reconstruct(info, events)`` replays a whole stream (the CLI, tests, notebooks).
"""

from .anthropic import AnthropicDecoder
from .base import Decoder, Delta, Reconstruction, RequestInfo
from .dispatch import SniffingDecoder, decoder_for
from .gemini import GeminiDecoder
from .generic import GenericDecoder
from .ollama import OllamaDecoder
from .openai_chat import OpenAIChatDecoder
from .openai_responses import OpenAIResponsesDecoder
from .reconstruct import reconstruct

__all__ = [
    "AnthropicDecoder",
    "Decoder",
    "Delta",
    "GeminiDecoder",
    "GenericDecoder",
    "OllamaDecoder",
    "OpenAIChatDecoder",
    "OpenAIResponsesDecoder",
    "Reconstruction",
    "RequestInfo",
    "SniffingDecoder",
    "decoder_for",
    "reconstruct",
]
