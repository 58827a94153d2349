"""Flax linen models: IR backbones, margin heads, QAConv, the occlusion head, the OAML model, the input
contract (`face_input`) and the config -> module factory. Import the submodules directly."""
