"""ml_collections training configs: default (every knob), the MS1MV2 recipes, the demo."""
