"""Pairwise preference classification (task pair_classify): which of two responses people preferred. `encode`
turns pairs into model inputs, `task` is the Task the loop trains, `metrics` scores predictions. The recipe section
is lmlab.recipe.pair, the records lmlab.data.pairs, the models lmlab.models.pairs."""
