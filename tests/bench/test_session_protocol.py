"""The engine session's contract (processors/chroma/session_protocol.py) holds for the real session and
for every stand-in the benchmarks put in its place, member by member and signature by signature."""

import dataclasses
import importlib
import inspect
import pkgutil
import typing

import pytest

import bench.phone
import bench.pipeline
from processors.chroma.session import AudioChunk, ChromaSession
from processors.chroma.session_protocol import SpeechChunk, SpeechSession

METHODS = [
    name
    for name, member in vars(SpeechSession).items()
    if inspect.isfunction(member) and not name.startswith("_")
]
DATA = list(typing.get_type_hints(SpeechSession))  # model, system_prompt, on_tool_call
PROPERTIES = [name for name, member in vars(SpeechSession).items() if isinstance(member, property)]


def stand_ins() -> list[type]:
    """Every class in the benchmark packages that answers turns (has a `respond`): each stands in for
    the engine session behind ChromaS2SService."""
    found = []
    for package in (bench.pipeline, bench.phone):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name.endswith(".__main__"):
                continue
            module = importlib.import_module(info.name)
            for cls in vars(module).values():
                if inspect.isclass(cls) and cls.__module__ == module.__name__ and hasattr(cls, "respond"):
                    found.append(cls)
    return found


def shape(function) -> list[tuple[str, inspect._ParameterKind, object]]:
    """A signature's parameters by name, kind and default; annotations are documentation here."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def contract_breaches(cls: type) -> list[str]:
    problems = []
    for name in METHODS:
        expected = getattr(SpeechSession, name)
        actual = getattr(cls, name, None)
        if not callable(actual):
            problems.append(f"{cls.__name__}.{name}: missing")
            continue
        if shape(actual) != shape(expected):
            problems.append(
                f"{cls.__name__}.{name}{inspect.signature(actual)}: expected {name}{inspect.signature(expected)}"
            )
        if inspect.iscoroutinefunction(actual) != inspect.iscoroutinefunction(expected):
            problems.append(f"{cls.__name__}.{name}: async in one and not the other")
    for name in PROPERTIES:
        if not isinstance(inspect.getattr_static(cls, name, None), property):
            problems.append(f"{cls.__name__}.{name}: expected a property")
    return problems


STAND_INS = stand_ins()


def test_the_benchmarks_have_a_stand_in_to_check():
    # If the stand-in moves out of these packages, this test must follow it, not pass on nothing.
    assert [cls.__name__ for cls in STAND_INS] == ["StandInSession"]
    assert {"respond", "cancel", "heard", "prepare_voice"} <= set(METHODS)
    assert set(DATA) == {"model", "system_prompt", "on_tool_call"} and PROPERTIES == ["kept_text"]


def test_the_real_session_keeps_the_contract(tiny, voice):
    assert contract_breaches(ChromaSession) == []
    session = tiny.new_session(voice, "You are a test agent.")
    assert isinstance(session, SpeechSession)
    assert {f.name for f in dataclasses.fields(AudioChunk)} >= set(typing.get_type_hints(SpeechChunk))


@pytest.mark.parametrize("cls", STAND_INS, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_stand_in_keeps_the_contract_with_the_real_sessions_signatures(cls):
    assert contract_breaches(cls) == []


async def test_the_stand_in_answers_as_the_service_asks():
    from bench.pipeline.common import StandInModel

    session = StandInModel(reply_secs=0.48).new_session(None, "prompt", chunk_frames=2)
    assert isinstance(session, SpeechSession)
    chunks = [chunk async for chunk in session.respond(None, say="One moment.")]
    assert chunks and all(isinstance(chunk, SpeechChunk) for chunk in chunks)
    assert chunks[-1].frames[1] == 6 and chunks[-1].text == "One moment."
