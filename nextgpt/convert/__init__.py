"""Weights in and out: the original NExT-GPT's delta checkpoint and Hugging Face folders.

    python -m nextgpt.convert from_legacy checkpoint=PATH out=DIR [model=... other overrides]
    python -m nextgpt.convert to_legacy bundle=DIR out=FILE
    python -m nextgpt.convert to_hf bundle=DIR out=DIR

See :mod:`nextgpt.convert.legacy` (the key mapping) and :mod:`nextgpt.convert.hf` (the export).
"""
