"""Shared inference code: loading a run folder, the fold-ensemble predictor, batch mode, a local
stand-in for the competition gateway, latency measurement and Kaggle packaging.

Nothing here depends on a particular experiment: an experiment's ``inference.py`` builds its own
model from the run's config and hands the fold models to :class:`EnsemblePredictor`.
The modules import only what a Kaggle notebook image has (torch, numpy, polars, scipy,
scikit-learn, transformers, PyYAML); Hydra and OmegaConf are needed only on the command line.
"""
