"""llama.cpp's own server test suite, run against a llama-server and against a node.

Issue 11's check of transparency: the suite (`tools/server/tests` in the llama.cpp
source the project builds from, kept by `tools/build-llama`) passes through a node
as it passes against llama-server directly. Both runs use the same stand-in for the
`llama-server` binary (`server.py`), which serves the demo model in place of the
suite's Hugging Face downloads (nothing here reaches the network): once as
llama-server itself, once as `meshllm up` with the suite's flags passed through
`--llama-arg`. The verdict is the difference of the two runs: tests that pass
directly and fail through the node.

    .venv/bin/python -m tests.llama_suite [PYTEST ARGS...]   # the whole suite, ~30 min
    .venv/bin/python -m tests.llama_suite unit/test_tokenize.py

tests/test_llama_suite.py runs a few files of it in the test suite.
"""
