"""Model artifacts (model.json + weights.safetensors, :mod:`.artifact`), how pixels become network
input (:mod:`.normalization`), and the registry of versions (:mod:`.registry`)."""
