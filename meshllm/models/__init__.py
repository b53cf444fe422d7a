"""Model files: resolving a `--model` reference, scanning GGUF headers,
the built-in catalog, resumable checked downloads and the generated demo model.
"""
