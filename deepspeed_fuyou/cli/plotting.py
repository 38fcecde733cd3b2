"""matplotlib for the commands that draw (`fuyou trace -o`, `fuyou estimate --plot`, the main job's pictures).

matplotlib is the optional `plot` extra: a machine without it gets an error naming the option that asked for a
picture and how to install it, never an ImportError. Pictures go to files only (the Agg backend): training hosts
have no display.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from deepspeed_fuyou.errors import FuyouConfigError


def pyplot(option: str, output: Path) -> ModuleType:
    """`matplotlib.pyplot` drawing to files; FuyouConfigError naming `option` (what asked for `output`) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as err:
        raise FuyouConfigError(
            option, str(output), "drawing needs matplotlib", "pip install 'deepspeed-fuyou[plot]'"
        ) from err
    return plt


def save(figure: Any, output: Path, dpi: int = 120, **layout: Any) -> None:
    """Lays `figure` out (`layout`: `tight_layout`'s arguments), writes it to `output` and frees it."""
    from matplotlib import pyplot as plt

    figure.tight_layout(**layout)
    figure.savefig(output, dpi=dpi)
    plt.close(figure)
