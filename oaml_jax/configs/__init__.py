"""The configs the library itself needs: `default` (every knob, documented) and `demo` (the embedded run).

Recipe files under the checkout's `configs/` are read by path (`--config=configs/ir50_ms1mv2.py`) and build on
`oaml_jax.configs.default`, so they work from any directory once the package is installed.
"""
