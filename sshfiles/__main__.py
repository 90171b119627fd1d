"""`python -m sshfiles` is the admin CLI."""

from .cli import main

main()
