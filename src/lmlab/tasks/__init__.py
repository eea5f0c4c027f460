"""Tasks: what the one training loop needs from lm/sft (`causal_lm`) and pair_classify (`pairs`); the protocol is
`base.Task`."""
