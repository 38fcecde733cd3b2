"""How many of the last layers keep their activations in device memory (`activations.offload: "auto"`).

Backward starts with the last layer, so its activations are needed at once: offloading them buys no memory at the
peak (they would be read back immediately) and makes backward wait for the read. Further down, a layer's reads can
run while the layers above it compute their backward. The policy keeps the fewest last layers such that moving the
rest takes no longer than the compute it hides behind, in both directions:
  * forward: writing (L - K) layers must fit in the forward of L layers;
  * backward: reading (L - K) layers must fit in the backward of L layers (about twice the forward).
Inputs are measured, not assumed: the transfer bandwidth by a probe on the tier itself, the per-layer forward
time and bytes in the first forward pass (which keeps one layer while it measures).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

BACKWARD_TO_FORWARD = 2.0
"""Backward of a transformer layer costs about twice its forward (two matmuls per forward matmul)."""


@dataclass(frozen=True)
class Measurements:
    """What one forward pass of the model told the policy."""

    layers: int
    forward_seconds_per_layer: float
    offloadable_bytes_per_layer: float
    write_bytes_per_second: float
    read_bytes_per_second: float


def layers_to_keep(m: Measurements) -> int:
    """The number of last layers whose activations stay put: at least 1, at most every layer."""
    if m.layers == 0:
        return 0
    forward = m.layers * m.forward_seconds_per_layer
    backward = BACKWARD_TO_FORWARD * forward
    keep = 1
    for bandwidth, window in ((m.write_bytes_per_second, forward), (m.read_bytes_per_second, backward)):
        if m.offloadable_bytes_per_layer <= 0:
            continue
        movable_layers = window * bandwidth / m.offloadable_bytes_per_layer
        keep = max(keep, math.ceil(m.layers - movable_layers))
    return min(keep, m.layers)


def measure(
    layers: int,
    layer_seconds: Mapping[int, float],
    layer_bytes: Mapping[int, int],
    bandwidth: Callable[[int], tuple[float, float]],
) -> Measurements:
    """The policy's inputs from one forward pass (seconds and offloadable bytes of each layer it ran) and the
    tier's write and read `bandwidth`, probed with the largest layer's bytes."""
    seconds = [layer_seconds.get(i, 0.0) for i in range(layers)]
    per_layer = [layer_bytes.get(i, 0) for i in range(layers)]
    write, read = bandwidth(max(per_layer, default=0))
    return Measurements(
        layers=layers,
        forward_seconds_per_layer=sum(seconds) / max(layers, 1),
        offloadable_bytes_per_layer=sum(per_layer) / max(layers, 1),
        write_bytes_per_second=write,
        read_bytes_per_second=read,
    )
