"""CLI command groups beyond run/validate/runs. Each module registers its commands on `lmlab.cli.app`;
`lmlab.cli` imports them all at the bottom. Commands stay thin: parse, call one library function, print."""
from lmlab.commands import (
    compare,  # noqa: F401
    data,  # noqa: F401
    finetune,  # noqa: F401
    plan,  # noqa: F401
    serve,  # noqa: F401
)
