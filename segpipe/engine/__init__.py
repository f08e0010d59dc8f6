"""The tiled-inference engine: predictor, per-image segmentation on Dask, pyramid, cluster."""
