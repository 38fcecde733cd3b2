"""Checkpoint directories are committed whole: under its name a checkpoint is complete, or refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepspeed_fuyou import checkpoints
from deepspeed_fuyou.errors import FuyouIOError


def written(save_dir: Path, tag: str, content: str) -> None:
    """What DeepSpeed's save leaves under the partial name: some files, in a sub-folder too."""
    partial = save_dir / checkpoints.partial_tag(tag)
    (partial / "offloaded_tensors").mkdir(parents=True)
    (partial / "model_states.pt").write_text(content)
    (partial / "offloaded_tensors" / "master.swp").write_text(content)


def test_a_committed_save_is_complete_under_its_tag_and_latest_names_it(tmp_path: Path) -> None:
    written(tmp_path, "step5", "five")
    checkpoints.commit(tmp_path, "step5", save_latest=True)
    assert (tmp_path / "step5" / "offloaded_tensors" / "master.swp").read_text() == "five"
    assert not (tmp_path / checkpoints.partial_tag("step5")).exists()
    assert checkpoints.latest_tag(tmp_path) == "step5"
    assert checkpoints.complete_tags(tmp_path) == ["step5"]
    checkpoints.check_complete(tmp_path, "step5")


def test_without_save_latest_the_previous_latest_stays(tmp_path: Path) -> None:
    written(tmp_path, "step5", "five")
    checkpoints.commit(tmp_path, "step5", save_latest=True)
    written(tmp_path, "step6", "six")
    checkpoints.commit(tmp_path, "step6", save_latest=False)
    assert checkpoints.latest_tag(tmp_path) == "step5"
    assert checkpoints.complete_tags(tmp_path) == ["step5", "step6"]


def test_saving_a_tag_again_replaces_the_complete_one(tmp_path: Path) -> None:
    for content in ("first", "second"):
        written(tmp_path, "step5", content)
        checkpoints.commit(tmp_path, "step5", save_latest=True)
    assert (tmp_path / "step5" / "model_states.pt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step5"]


def test_a_save_cut_off_is_left_over_only_until_the_next_save_of_its_tag(tmp_path: Path) -> None:
    written(tmp_path, "step5", "cut off")
    checkpoints.remove_partial(tmp_path, "step5")
    assert not list(tmp_path.iterdir())


def test_loading_an_incomplete_checkpoint_is_refused_naming_the_newest_complete_one(tmp_path: Path) -> None:
    written(tmp_path, "step5", "five")
    checkpoints.commit(tmp_path, "step5", save_latest=True)
    written(tmp_path, "step10", "cut off")
    with pytest.raises(FuyouIOError, match="incomplete") as err:
        checkpoints.check_complete(tmp_path, checkpoints.partial_tag("step10"))
    assert "tag='step5'" in err.value.fix
    (tmp_path / "step10").mkdir()  # e.g. a directory DeepSpeed began before this version of fuyou
    with pytest.raises(FuyouIOError, match="incomplete"):
        checkpoints.check_complete(tmp_path, "step10")
    with pytest.raises(FuyouIOError, match="does not exist"):
        checkpoints.check_complete(tmp_path, "step20")


def test_with_no_complete_checkpoint_the_refusal_says_to_start_again(tmp_path: Path) -> None:
    written(tmp_path, "step5", "cut off")
    with pytest.raises(FuyouIOError) as err:
        checkpoints.check_complete(tmp_path, checkpoints.partial_tag("step5"))
    assert "start the run again" in err.value.fix
