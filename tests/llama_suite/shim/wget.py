"""Stands in for the `wget` package the llama.cpp suite imports: nothing is downloaded
(the stand-in server serves the demo model instead)."""


def download(url: str, out: str | None = None, bar: object = None) -> str:
    raise RuntimeError(f"no downloads in the meshllm run of the llama.cpp suite: {url}")
