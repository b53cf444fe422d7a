"""meshllm: pool a group's machines into one OpenAI-compatible LLM service."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 3
"""2: ids proven by keys in admission, signed announcements (nodes of version 1 cannot
link with these: every frame names its version, and the other is refused).
3: announcements with `backend_models`, `paused`, `also_serving`, `demand` and `ext`
(a version 2 node would re-encode them without the new fields and find every such
signature forged, so the versions refuse each other by name instead); from 3 on, new
announcement fields go in `ext`, which every version signs, checks and relays as it is."""
