"""``python -m nextgpt.cache``: the command lives in :mod:`nextgpt.cli.cache` (it wires the data side in)."""

from nextgpt.cli.cache import main

main()
