"""The render stage: settings and presets, the sampler, the clip driver, the engine worker, mp4 output and
the ``python -m inference.generate`` command line."""
