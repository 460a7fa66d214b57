"""Fixtures shared by the test modules. The helpers tests call live beside them (datagen, evalgen, standins,
hf_tower, losses_reference) and in clip_dro.bench: the one launcher of ``clip-dro`` and torchrun
(``launch``) and the fault scenarios (``faults``), which bench/ uses too."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from evalgen import BAD, write_eval_sets


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Callable[[str], Path]:
    """``tmp_path_factory.mktemp`` for the files a test module's fixtures share; what it made goes when the
    module is done: runs keep checkpoints of tens of MB, and a suite that kept every module's would fill a CI
    disk."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The tiny synthetic set (480 training pairs, seed 0, with its retrieval and zero-shot sets) that the
    training, scale-out, evaluation and fault tests read. Made once a session: tests copy it before damaging
    it, none writes into it."""
    from clip_dro.bench import faults  # here: what conftest imports on top, every test file loads

    return faults.prep_data(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def bad_sets(tmp_path_factory) -> tuple[Path, Path]:
    """Evaluation sets with evalgen.BAD's bad images, and the same sets without those samples."""
    root = tmp_path_factory.mktemp("bad")
    return (write_eval_sets(root / "bad", BAD),
            write_eval_sets(root / "clean", {name: {i: None for i in bad} for name, bad in BAD.items()}))
