"""The edge side: the Flower ClientApp and what it needs (model, data, DP training)."""
