"""The HTTP side of a node: the OpenAI-compatible Proxy application, the route
table it decides with (`routing`), the one pooled HTTP/1.1 upstream client
(`upstream`) used for llama-server wherever a node talks to it, the uvicorn
set-up shared by the actors (`asgi`) and the web console (`console`, assets in
`static/`). See docs/design.md, "The request path".
"""
