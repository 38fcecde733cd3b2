"""The corpus of bad configs under tests/configs/bad: each is rejected, naming exactly the fields that are wrong.

Each file holds `config` (a whole DeepSpeed config) and `expected_fields` (the JSON paths the error must name, all
of them in one error). `$SWAP` stands for a writable directory, `$MISSING` for one that does not exist and `$FILE`
for a regular file, `$LOOP` for a symbolic link to itself (through a second one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.plan.preflight import load_fuyou_config

CORPUS = sorted((Path(__file__).parent / "configs" / "bad").glob("*.json"))


def load(path: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    swap, regular_file = tmp_path / "swap", tmp_path / "file"
    swap.mkdir()
    regular_file.write_text("not a directory")
    loop, back = tmp_path / "loop", tmp_path / "back"
    loop.symlink_to(back)
    back.symlink_to(loop)
    text = path.read_text()
    for placeholder, value in {
        "$SWAP": swap,
        "$MISSING": tmp_path / "missing",
        "$FILE": regular_file,
        "$LOOP": loop,
    }.items():
        text = text.replace(placeholder, str(value))
    case = json.loads(text)
    return case["config"], case["expected_fields"]


def test_the_corpus_has_at_least_30_configs() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_config_is_rejected_naming_every_wrong_field_with_a_fix(path: Path, tmp_path: Path) -> None:
    config, expected_fields = load(path, tmp_path)
    with pytest.raises(FuyouConfigError) as caught:
        load_fuyou_config(config)
    assert sorted(caught.value.fields) == sorted(expected_fields), str(caught.value)
    for problem in caught.value.problems:
        assert problem.reason and problem.fix, problem.line()
        assert problem.line() in str(caught.value)
