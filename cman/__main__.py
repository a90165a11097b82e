"""`python -m cman ...` is the `cman` command."""

from cman.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
