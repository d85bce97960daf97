"""`python -m dslaunch` is the `dslaunch` command."""

from dslaunch.cli import main

main()
