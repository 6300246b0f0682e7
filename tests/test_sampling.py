"""Sampling values: ranges refused with a message that names the field, request fields only for set values."""

from __future__ import annotations

import pytest

from tuichat.chat.sampling import Sampling, SamplingError, parse_value, sampling_from_table


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("temperature", "3", "in [0, 2]"),
        ("temperature", "-0.1", "in [0, 2]"),
        ("temperature", "warm", "not a number"),
        ("top_p", "0", "in (0, 1]"),
        ("top_p", "1.5", "in (0, 1]"),
        ("top_k", "-1", ">= 0"),
        ("top_k", "2.5", "whole number"),
        ("min_p", "1.1", "in [0, 1]"),
        ("repetition_penalty", "0", "> 0"),
        ("repetition_penalty", "nan", "> 0"),
        ("max_tokens", "0", ">= 1"),
        ("seed", "-3", ">= 0"),
    ],
)
def test_out_of_range_values_are_refused(name: str, text: str, fragment: str) -> None:
    with pytest.raises(SamplingError) as info:
        parse_value(name, text)
    assert info.value.name == name
    assert fragment in info.value.message


def test_blank_means_server_default_and_is_not_sent() -> None:
    assert parse_value("temperature", "  ") is None
    assert Sampling().request_fields() == {}


def test_set_values_become_request_fields() -> None:
    s = Sampling(temperature=0.7, top_k=40, max_tokens=256, seed=7, stop=("###", "END"))
    assert s.request_fields() == {
        "temperature": 0.7,
        "top_k": 40,
        "max_tokens": 256,
        "seed": 7,
        "stop": ["###", "END"],
    }


def test_edges_of_ranges_are_accepted() -> None:
    assert parse_value("temperature", "0") == 0.0
    assert parse_value("temperature", "2") == 2.0
    assert parse_value("top_p", "1") == 1.0
    assert parse_value("top_k", "0") == 0
    assert parse_value("stop", "a, b,,") == ("a", "b")


def test_table_round_trip_and_bad_key() -> None:
    s = Sampling(system_prompt="Be brief.", temperature=0.2, stop=("x",))
    assert sampling_from_table(s.to_table()) == s
    with pytest.raises(SamplingError) as info:
        sampling_from_table({"temprature": 1})
    assert info.value.name == "temprature"
    with pytest.raises(SamplingError):
        sampling_from_table({"top_p": True})
