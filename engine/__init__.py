"""zopro's training engine: recipes, models, data, rollouts, optimisers, the pipeline and the run directory."""

__version__ = "0.1.0"
