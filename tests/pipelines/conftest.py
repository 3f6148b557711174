"""Fixtures: a tiny run of every task (see pipeline_runs.py), trained once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from pipeline_runs import TASKS, Run, make_run


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny GEMMs gain nothing from threads, and on a shared machine spinning workers cost 100×
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", params=TASKS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return make_run(request.param, tmp_path_factory.mktemp(request.param))

