"""Exporting a run: a Hugging Face folder with the verified LoRA merge (`hf`), a GGUF file (`gguf`)."""
