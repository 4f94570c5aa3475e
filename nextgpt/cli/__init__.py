"""The command-line entry points: the one place inside ``nextgpt/`` that wires the data side
(``datamodules/``) and the callbacks (``callbacks/``) to the library. ``train.py`` and
``evaluate.py`` at the top level call :mod:`nextgpt.cli.train` and :mod:`nextgpt.cli.evaluate`.
"""

from __future__ import annotations
