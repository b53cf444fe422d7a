"""The HTTP side of a node: the OpenAI-compatible Proxy application (`proxy`),
the route table it decides with (`routing`), the one HTTP/1.1 response parser
(`h1`, on httptools) under the one pooled upstream client (`upstream`) that
every part of a node uses to talk to llama-server or the Tunnel, the one
OpenAI error formatter (`errors`), the cross-site rule for browsers
(`origin`, `--cors-origin`), the uvicorn set-up shared by the actors
(`asgi`) and the web console (`console`, assets in `static/`). See
docs/design.md, "The request path".
"""
