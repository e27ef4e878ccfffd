"""Each of the 22 supported IFEval instructions: a hand-written following and violating
response, for explicitly given arguments, scored by the gold judge with nltk data and the
network blocked (the judge must work offline)."""

from __future__ import annotations

import socket

import nltk
import pytest

from dice_jax.judge.prompts import SUPPORTED_INSTRUCTIONS, build_instruction
from dice_jax.judge.score import score_response

# (instruction id, kwargs, following response, violating response)
CASES = [
    ("keywords:existence", {"keywords": ["garden", "river"]},
     "The garden is next to the river.", "The garden is lovely in spring."),
    ("keywords:frequency", {"keyword": "tea", "frequency": 3, "relation": "at least"},
     "Tea is great. I drink tea daily. Green tea is best.", "Tea is great. Coffee too."),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "less than"},
     "I like tea in the morning.", "Tea is great and tea is cheap."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]},
     "Birds sing in every category of weather.", "My dog sleeps all day."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zebras zigzag through the zoo.", "Horses run in the field."),
    ("keywords:letter_frequency", {"letter": "e", "let_frequency": 2, "let_relation": "less than"},
     "A big dog.", "Everyone here sees the tree."),
    ("language:response_language", {"language": "fr"},
     "Le ciel est bleu parce que la lumière du soleil est diffusée par l'air de notre planète.",
     "The sky is blue because sunlight is scattered by the air around our planet."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "First part.\n***\nSecond part.\n***\nThird part.", "First part.\n***\nSecond part."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "Just four words here.", "This sentence clearly has more than five words."),
    ("length_constraints:number_words", {"num_words": 6, "relation": "at least"},
     "One two three four five six seven.", "Too short."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "The first paragraph is here.\n\nHowever, the second one starts right.",
     "The first paragraph is here.\n\nThe second one starts wrong."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], let us meet at [place].", "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Thanks for your help.\nP.S. See you on Friday.", "Thanks for your help. See you on Friday."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Thanks.\nP.S. One.\nP.P.S Two.", "Thanks.\nP.S. One."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* Drink water.\n* Sleep well.", "* Drink water.\n* Sleep well.\n* Walk daily."),
    ("detectable_format:constrained_response", {},
     "My answer is yes.", "Yes, definitely."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "This is *important* and *urgent*.", "This is *important* only."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe start.\nSection 2\nThe end.", "Section 1\nOnly one part."),
    ("detectable_format:json_format", {},
     '```json\n{"answer": "blue"}\n```', "The answer is blue."),
    ("detectable_format:title", {},
     "<<A Good Day>>\nIt was sunny.", "A Good Day\nIt was sunny."),
    ("combination:two_responses", {},
     "Cats are calm.\n******\nDogs are loyal.", "Cats are calm and dogs are loyal."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Drink water and rest. Any other questions?", "Any other questions? Drink water and rest."),
    ("change_case:english_capital", {},
     "THE SKY IS BLUE BECAUSE SUNLIGHT IS SCATTERED BY THE AIR.",
     "The sky is blue because sunlight is scattered by the air."),
    ("change_case:english_lowercase", {},
     "the sky is blue because sunlight is scattered by the air.",
     "The sky is blue because sunlight is scattered by the air."),
    ("punctuation:no_comma", {}, "Red and blue are colours.", "Red, blue and green are colours."),
    ("startend:quotation", {}, '"Hello there, friend."', "Hello there, friend."),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any nltk data file load or network connection fails the check (as a counted error)."""
    def no_data(*args, **kwargs):
        raise LookupError("nltk data blocked in this test")

    def no_network(*args, **kwargs):
        raise OSError("network blocked in this test")

    monkeypatch.setattr(nltk.data, "load", no_data)
    monkeypatch.setattr(nltk.data, "find", no_data)
    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_every_supported_instruction_has_a_case():
    assert len(SUPPORTED_INSTRUCTIONS) == 22
    assert {case[0] for case in CASES} == set(SUPPORTED_INSTRUCTIONS)


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_following_and_violating(iid, kwargs, good, bad):
    row = {"id": "t", "instruction_ids": [iid], "kwargs": [kwargs]}
    followed = score_response(row, good)
    violated = score_response(row, bad)
    assert followed.errors == () and violated.errors == ()
    assert followed.followed == (True,) and followed.score == 1.0 and followed.all_followed
    assert violated.followed == (False,) and violated.score == 0.0 and not violated.all_followed


@pytest.mark.parametrize("iid", SUPPORTED_INSTRUCTIONS)
def test_kwargs_rebuild_same_arguments(iid):
    kwargs = next(c[1] for c in CASES if c[0] == iid)
    instruction, description = build_instruction(iid, kwargs)
    assert (instruction.get_instruction_args() or {}) == kwargs
    assert description and isinstance(description, str)


def test_excluded_instructions_need_nltk_data():
    """The excluded two really do fail without nltk data: counted as errors, not followed."""
    row = {"instruction_ids": ["length_constraints:number_sentences",
                               "change_case:capital_word_frequency"],
           "kwargs": [{"num_sentences": 1, "relation": "at least"},
                      {"capital_frequency": 1, "capital_relation": "at least"}]}
    score = score_response(row, "ONE sentence here.")
    assert score.followed == (False, False) and len(score.errors) == 2
