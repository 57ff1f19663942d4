"""Squeezeformer encoder, masked mean+max pooling, demographics fusion, gesture and target heads."""
