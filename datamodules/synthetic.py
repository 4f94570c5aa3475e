"""``python -m datamodules.synthetic --out DIR [--num N] [--seed S] [--force]``: write the project's
synthetic data set in the NExT-GPT layout. The generator is test-data building, kept with the tiny
backbones in :mod:`nextgpt.world.synthetic` (the tiny LLM is pre-trained on its caption grammar)."""

import sys

from nextgpt.world.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
