"""FedRolex (Alam et al., NeurIPS 2022): HeteroFL with a channel window that rolls every round."""

from __future__ import annotations

from neulite.algorithms.heterofl import HeteroFL


class FedRolex(HeteroFL):
    """In round r a width-w client trains channels (r + i) mod C, i < wC, of every hidden dimension.

    With leading channels (HeteroFL) the last channels of a layer are trained only by the clients
    wide enough to reach them; rolling the window lets every client train every channel in turn.
    Dimensions the width does not scale (image channels, classes) are never sliced. Sub-model
    extraction, element-wise averaging, static BatchNorm and the parameters are HeteroFL's.
    """

    def window_start(self, rnd: int) -> int:
        return rnd
