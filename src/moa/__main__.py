"""`python -m moa` is the `moa` command."""

from moa.cli import main

if __name__ == "__main__":
    main()
