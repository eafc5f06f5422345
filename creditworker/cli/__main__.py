"""`python -m creditworker.cli`: the same as the `creditworker` command."""

from creditworker.cli.root import main

main()
