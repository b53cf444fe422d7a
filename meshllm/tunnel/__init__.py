"""Requests for a model served elsewhere, carried over QUIC.

The sans-I/O parts of the Tunnel actor: the frame the Proxy sends over its
unix connection, the stream header between two nodes' Tunnels, and the
bridge between a QUIC stream and an asyncio stream. See docs/design.md,
"The request path".
"""
