"""Squeezeformer encoder, a learnable CLS token and a BertModel head instead of pooling, demographics fusion, gesture and target heads."""
