"""Offline preference data loading and the random:PRESET model source."""

import json

import pytest

from dice_jax.checkpoints import load_model
from dice_jax.data import load_preference_data, split_holdout
from dice_jax.errors import DiceError

ULTRAFEEDBACK_STYLE = {
    "prompt": "Name a prime.",
    "chosen": [{"role": "user", "content": "Name a prime."},
               {"role": "assistant", "content": "7"}],
    "rejected": [{"role": "user", "content": "Name a prime."},
                 {"role": "assistant", "content": "8"}],
    "score_chosen": 9.0,
}


def test_jsonl_and_parquet_and_conversational_rows(tmp_path):
    from datasets import Dataset

    rows = [ULTRAFEEDBACK_STYLE, {"prompt": "Hi", "chosen": "Hello!", "rejected": "No."}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_preference_data(str(path))
    assert loaded[0]["prompt"] == "Name a prime." and loaded[0]["chosen"] == "7"
    assert loaded[0]["rejected"] == "8" and loaded[0]["score_chosen"] == 9.0
    assert loaded[1] == rows[1]
    Dataset.from_list([rows[1]] * 5).to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_preference_data(str(tmp_path / "d.parquet"))) == 5


def test_subset_and_holdout_are_seeded(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"})
                            + "\n" for i in range(50)))
    a = load_preference_data(str(path), max_rows=10, seed=1)
    assert a == load_preference_data(str(path), max_rows=10, seed=1)
    assert a != load_preference_data(str(path), max_rows=10, seed=2)
    train, held = split_holdout(a, 3, seed=0)
    assert len(train) == 7 and len(held) == 3
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_bad_data_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DiceError, match=r"bad\.jsonl: row 0 has no 'rejected' column"):
        load_preference_data(str(path))
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(DiceError, match=r"bad\.jsonl:2: not valid JSON"):
        load_preference_data(str(path))
    with pytest.raises(DiceError, match="file not found"):
        load_preference_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DiceError, match="no such built-in data set"):
        load_preference_data("builtin:nope")


def test_random_source_byte_tokenizer_round_trips():
    model = load_model("random:tiny")
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Héllo, wörld! 🙂"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < model.config.vocab_size
    assert model.config.vocab_size == len(tok) == 260
    assert model.config.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    a = load_model("random:tiny").params["layers"]["attn"]["q_proj"]
    assert (a == model.params["layers"]["attn"]["q_proj"]).all()  # seeded
