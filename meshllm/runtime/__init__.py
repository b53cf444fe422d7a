"""The actor runtime of one node.

The root process (`root.Node`) spawns each actor of `actors/` as its own OS
process, restarts one that dies (with the one `backoff` policy), and turns signals into the
same shutdown the control socket takes. Actors talk msgspec messages
(`messages`) over local ZeroMQ sockets (`bus`, `actor`). Also here: the node's
configuration (`config`), its home and run directories (`paths`), logging,
process-tree helpers and where the llama.cpp binaries come from.
See docs/design.md, "Actors".
"""
