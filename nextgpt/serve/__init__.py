"""An OpenAI-compatible server for stage bundles: ``python -m nextgpt.serve bundle=DIR port=N``.

:mod:`nextgpt.serve.protocol` reads the chat-completions wire format, :mod:`nextgpt.serve.app`
serves it (FastAPI on uvicorn), :mod:`nextgpt.serve.__main__` is the command line.
"""
