"""``python -m beyondloss``: the same command line as the ``beyondloss`` script."""

from beyondloss.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
