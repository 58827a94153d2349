"""Data sources, augmentation, synthetic occlusion, samplers and Grain pipelines."""
