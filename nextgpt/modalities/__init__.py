"""Modalities added beside the built-in image, audio and video: one module each, registered when
:mod:`nextgpt.modality` is first imported (see its docstring)."""
