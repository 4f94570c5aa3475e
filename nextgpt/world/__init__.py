"""The toy world the project trains and measures itself in, all in one place.

- :mod:`nextgpt.world.synthetic`: the grammar (colours, shapes, positions; pitches, loudness,
  patterns; colours and directions of motion) and the generator that writes media whose captions
  are true of them, in the NExT-GPT layout.
- :mod:`nextgpt.world.attributes`: the attributes of each modality and what a caption says of them.
- :mod:`nextgpt.world.analysers`: the same attributes read back from media by plain signal processing
  (pixel colours and centroids; spectral peak, RMS and envelope; a centroid track over frames), so
  generated media are scored by what they show, not by a learned metric.
- :mod:`nextgpt.world.imagebind`, :mod:`nextgpt.world.llm`, :mod:`nextgpt.world.decoders` (with a
  recipe per decoder in :mod:`nextgpt.world.recipes`): the backbone trainers, and
  :mod:`nextgpt.world.build`, which builds all five once into ``${paths.world_backbones}``.
- :mod:`nextgpt.world.scorecard`: the scorecard of an ``evaluate.py -m task=world_*`` sweep.

Nothing on the real-weights path imports this package.
"""
