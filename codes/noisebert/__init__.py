"""NoiseBERT pretraining: masked reconstruction of IMU sequences under injected vibration noise."""
