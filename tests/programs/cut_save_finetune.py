"""The main job (through tests/programs/guarded.py) killed in the middle of a checkpoint save, as kill -9 would.

    CUT_AT_COPY=N FORBID=stock python tests/programs/cut_save_finetune.py <finetune arguments>

DeepSpeed copies each rank's offloaded optimizer state into the checkpoint with `shutil.copytree`; the N-th such
copy of the run copies part of the files and then ends the process on the spot (`os._exit`: no clean-up, no
atexit), leaving a half-written checkpoint behind, as a kill at that moment would.
"""

from __future__ import annotations

import os
import runpy
import shutil
from pathlib import Path
from typing import Any

COPIED_BEFORE_THE_CUT = 2  # files of the folder that reach the checkpoint before the process dies

copytree = shutil.copytree
copies = 0


def cut_copytree(source: str, target: str, *args: Any, **kwargs: Any) -> Any:
    global copies
    copies += 1
    if copies < int(os.environ["CUT_AT_COPY"]):
        return copytree(source, target, *args, **kwargs)
    Path(target).mkdir(parents=True)
    for file in sorted(Path(source).iterdir())[:COPIED_BEFORE_THE_CUT]:
        shutil.copyfile(file, Path(target) / file.name)
    os._exit(137)


if __name__ == "__main__":
    shutil.copytree = cut_copytree
    runpy.run_path(str(Path(__file__).with_name("guarded.py")), run_name="__main__")
