"""Model artifacts (model.json + weights.safetensors) and the registry of versions."""
