"""meshllm: pool a group's machines into one OpenAI-compatible LLM service."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
