"""Ground truth: the training/evaluation data layout and everything that turns what people draw into labels.

Below ``train`` and ``evaluate`` (both read datasets through it), above ``io`` and ``models``.
:mod:`segpipe.labels.dataset` owns the ``DATA/`` layout (images, masks, ``classes.json``,
``split.json``).
"""
