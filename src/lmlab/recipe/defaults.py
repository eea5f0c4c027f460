"""Defaults other layers need without loading the schema (which builds every pydantic model): the workspace folder
every command uses unless told otherwise (`run.output_dir`, `--output-dir`), where runs, checkpoints and the sqlite
ledger live. lmlab.workspace re-exports it; nothing else spells it out."""

DEFAULT_WORKSPACE = "lmlab-runs"
