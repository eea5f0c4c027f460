"""Evaluating a trained checkpoint: the JSON check and held-out loss (`json_check`), the LLM judge (`judge`)."""
