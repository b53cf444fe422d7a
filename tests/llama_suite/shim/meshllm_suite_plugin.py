"""Loaded into the llama.cpp suite's pytest (`-p meshllm_suite_plugin`): its presets are
not started once each up front to download their models (`ServerPreset.load_all`),
since the stand-in server serves the demo model and needs no download."""

import utils  # the suite's own module (its directory is on sys.path)

utils.ServerPreset.load_all = staticmethod(lambda: None)
