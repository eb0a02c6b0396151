"""Sub-commands of the ``namm`` CLI; each module has ``add_parser(subparsers)``."""

from namm.commands import generate

COMMANDS = [generate]
