"""Feature caches: frozen-model outputs (ImageBind features, decoder text embeddings) computed once,
stored memory-mapped next to the data, and found again by fingerprint.

- :mod:`nextgpt.cache.store`: the on-disk store (``FeatureStore``) and the fingerprints of files;
- :mod:`nextgpt.cache.encode`: which store holds what, and encoding media and captions into one;
- :mod:`nextgpt.cache.captions`: the alignment targets of stages 2-3, read from and added to a store.
"""
