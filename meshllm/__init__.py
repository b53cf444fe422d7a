"""meshllm: pool a group's machines into one OpenAI-compatible LLM service."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2
"""2: ids proven by keys in admission, signed announcements (nodes of version 1 cannot
link with these: every frame names its version, and the other is refused)."""
