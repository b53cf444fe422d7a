"""Requests for a model served elsewhere, carried over QUIC (the Tunnel actor's core).

`hop` is the msgspec request frame the Proxy sends over its kept-open unix
connections, and the Proxy's end of that hop; `client` the requesting side
(one QUIC link per peer, one stream per request, the host's response checked
by the one HTTP parser before the connection is reused); `server` the host's
side (the model checked, the request forwarded to llama-server with the
Proxy's upstream pool); `core` the sans-I/O pieces (peers' tunnel addresses,
response framing). See docs/design.md, "The request path".
"""
