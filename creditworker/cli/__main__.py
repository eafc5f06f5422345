"""`python -m creditworker.cli`: the same as the `creditworker` command."""

from creditworker.cli.app import main

main()
