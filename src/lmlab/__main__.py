"""`python -m lmlab` = the `lmlab` command; launchers need it: `accelerate launch -m lmlab run RECIPE`."""

from lmlab.cli import main

if __name__ == "__main__":
    main()
