"""`python -m pipeline ...` is `quickfix-labels ...`: the three stages in one command."""

from .fix import main

if __name__ == "__main__":
    raise SystemExit(main())
