"""Shared, tested code used by every experiment: schema, loading, features, folds, metric."""
