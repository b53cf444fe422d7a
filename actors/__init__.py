"""The node's actors: each module holds one actor class, run as its own OS process."""
