"""Generation: prompts rendered with a run's template (`prompts`), decoding and streaming (`decoding`). Sampling
presets are recipe settings (lmlab.recipe.generation); checkpoints load through lmlab.models.loading."""
