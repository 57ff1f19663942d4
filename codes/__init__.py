"""Experiment code for the Kaggle competition "CMI - Detect Behavior with Sensor Data"."""
