"""``segpipe segment`` with the network's forward replaced by a free one: logits = the normalised input.

Everything else is the real command: reading, normalisation, argmax, cropping, Zarr writes, Dask.
It shows what the host path costs — what a GPU, whose forward is nearly free at this scale,
would wait for. The model must have as many classes as bands (3 for RGB).

    python benchmarks/_free_segment.py segment SCENE --model MODEL --out OUT [segment options]
"""

from __future__ import annotations

from typing import Any

from segpipe.models import artifact


def _free(self: artifact.Artifact) -> Any:
    """A network with logits = input: no parameters, no compute beyond what the engine does around it.
    (torch is imported here, when the engine builds its network, not when this runner starts: the command
    sets torch's process up first, as for the real model.)"""
    import torch

    class FreeNetwork(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    if self.spec.in_channels != self.spec.num_classes:
        raise SystemExit("the free model needs as many classes as input bands")
    return FreeNetwork()


if __name__ == "__main__":
    artifact.Artifact.network = _free  # type: ignore[method-assign]
    from segpipe.cli.main import main

    main()
