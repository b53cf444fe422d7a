"""Requests for a model served elsewhere, carried over QUIC.

The Tunnel actor's parts: the frame the Proxy sends over its unix
connections and the Proxy's end of that hop (`hop`), the requesting side
(`client`), the host's side (`server`), and the decisions without I/O
(`core`). The aioquic adaptations they rely on are in `meshllm.mesh.quic`.
See docs/design.md, "The request path".
"""
