"""oaml_jax: Occlusion-Aware Metric Learning for face recognition in JAX/Flax."""
