"""Training: mask index (index), normalisation, augmentation (augment), patch sampling (sampler), settings,
loss, validation (validate), checkpoints, the loop (loop), synthetic scenes (synthetic_noise, synthetic_scene)
and their files (synthetic). The dataset layout lives in :mod:`segpipe.labels`."""
