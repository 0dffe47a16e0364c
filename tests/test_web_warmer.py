"""The metadata warmer gives way to the requests its process serves."""

from __future__ import annotations

import json
import os
import threading
import warnings
from typing import Any, cast

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from stockade.archive import Archive
from stockade.audit.events import Actor
from stockade.dicom.attributes import Level
from stockade.web import metadata, server
from stockade.web.app import ACTIVITY, create_app
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10
from tests.test_web_stow import multipart, post

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


def test_requests_are_counted_while_they_are_served(archive: Archive) -> None:
    seen: list[int] = []
    client = authed(TestClient(create_app(archive)), archive)
    original = metadata.build

    def spy(retrieval: Any, instances: list[Any], pause: Any = None) -> list[bytes | None]:
        seen.append(ACTIVITY.requests)
        return original(retrieval, instances, pause)

    ds = make_dataset()
    assert post(client, multipart([part10(ds)])).status_code == 200
    before = ACTIVITY.requests
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metadata, "build", spy)
        response = client.get(
            f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"
        )
    assert response.status_code == 200
    assert seen == [before + 1]  # the metadata request itself, while it was served
    assert ACTIVITY.requests == before


def test_build_pauses_before_each_instance(archive: Archive) -> None:
    client = authed(TestClient(create_app(archive)), archive)
    study = make_dataset()
    datasets = [study] + [
        make_dataset(
            StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID=study.SeriesInstanceUID
        )
        for _ in range(2)
    ]
    assert post(client, multipart(map(part10, datasets))).status_code == 200
    calls: list[int] = []
    retrieval = archive.retrieve(
        Level.SERIES,
        {"StudyInstanceUID": study.StudyInstanceUID, "SeriesInstanceUID": study.SeriesInstanceUID},
        service="cache",
        actor=Actor(via="internal"),
    )
    objects = metadata.build(retrieval, retrieval.instances, pause=lambda: calls.append(1))
    retrieval.finish()
    assert len(calls) == 3
    assert [json.loads(o or b"null")["00080018"]["Value"] for o in objects] == [
        [d.SOPInstanceUID] for d in datasets
    ]


def test_warmer_waits_while_busy_and_goes_on_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    warmer = server.MetadataWarmer(cast(Archive, None), 5.0)
    polls: list[float] = []

    def wait(timeout: float) -> bool:
        polls.append(timeout)
        if len(polls) == 3:
            ACTIVITY.requests -= 1  # the request ends during the third wait
        return False

    monkeypatch.setattr(warmer.stopping, "wait", wait)
    ACTIVITY.requests += 1
    warmer.give_way()
    assert polls == [server.WARM_POLL] * 3
    assert not ACTIVITY.busy()
    polls.clear()
    warmer.give_way()  # idle: no waiting
    assert polls == []


def test_warmer_gives_up_waiting_after_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    warmer = server.MetadataWarmer(cast(Archive, None), 5.0)
    polls: list[float] = []
    monkeypatch.setattr(warmer.stopping, "wait", lambda t: polls.append(t) or False)
    ACTIVITY.requests += 1
    try:
        warmer.give_way()
    finally:
        ACTIVITY.requests -= 1
    assert len(polls) == round(server.WARM_GIVE_WAY / server.WARM_POLL)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priority here")
def test_background_thread_priority_is_lowered() -> None:
    niceness: list[int] = []

    def run() -> None:
        server._lower_priority()
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert niceness == [os.getpriority(os.PRIO_PROCESS, 0) + 10]
