"""Preference rows -> token arrays: chat template, end-of-turn, truncation, bad input."""

import json

import numpy as np
import pytest

from dice_jax.errors import DiceError
from dice_jax.training.data import (
    PairSampler,
    build_pairs,
    read_rows,
    split_pairs,
    tokenize_pairs,
)

WORDS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"] + [
    f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   bos_token="<s>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> "
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return fast


def ids(text):
    return [WORDS.index(w) for w in text.split()]


def test_chat_template_and_end_of_turn(tokenizer):
    rows = [{"prompt": "w1 w2", "chosen": "w3 w4", "rejected": "w5"},
            {"prompt": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1"}],
             "chosen": [{"role": "user", "content": "w1"},
                        {"role": "assistant", "content": "w7 w7"}],
             "rejected": [{"role": "assistant", "content": "w8"}]}]
    data, stats = tokenize_pairs(rows, tokenizer, max_length=64, max_prompt_length=32,
                                 pad_to_multiple=16)
    assert stats.kept == 2 and data.input_ids.shape == (2, 2, 16)
    prompt = ids("<|user|> w1 w2 </s> <|assistant|>")
    chosen = prompt + ids("w3 w4 </s>")
    np.testing.assert_array_equal(data.input_ids[0, 0, :len(chosen)], chosen)
    assert (data.input_ids[0, 0, len(chosen):] == 0).all()  # right-padded with pad id
    np.testing.assert_array_equal(data.loss_mask[0, 0, :len(chosen)],
                                  [0] * len(prompt) + [1, 1, 1])
    np.testing.assert_array_equal(data.attention_mask[0, 1].sum(), len(prompt) + 2)
    # Message lists: the system turn is templated; the response is the last message.
    second = ids("<|system|> w9 </s> <|user|> w1 </s> <|assistant|> w7 w7 </s>")
    np.testing.assert_array_equal(data.input_ids[1, 0, :len(second)], second)
    # Explicit end-of-turn id overrides the tokenizer's eos.
    other, _ = tokenize_pairs(rows[:1], tokenizer, max_length=64, max_prompt_length=32,
                              eos_token_id=5)
    assert other.input_ids[0, 0, len(chosen) - 1] == 5


def test_bad_pairs_are_dropped_and_counted(tokenizer):
    rows = [{"prompt": "w1", "chosen": "w2", "rejected": "w3"},
            {"prompt": "w1", "chosen": "", "rejected": "w3"},
            {"prompt": "w1", "chosen": "w2", "rejected": "   "},
            {"prompt": "w1", "chosen": "w4 w5", "rejected": "w4 w5"}]
    data, stats = tokenize_pairs(rows, tokenizer, max_length=16, max_prompt_length=8)
    assert (len(data), stats.rows, stats.kept) == (1, 4, 1)
    assert (stats.dropped_empty, stats.dropped_identical) == (2, 1)
    assert "1/4 pairs kept" in stats.summary()


def test_missing_column_names_the_column(tokenizer):
    with pytest.raises(DiceError, match=r"row 1: missing column 'rejected'"):
        tokenize_pairs([{"prompt": "w1", "chosen": "w2", "rejected": "w3"},
                        {"prompt": "w1", "chosen": "w2"}], tokenizer, max_length=16,
                       max_prompt_length=8)
    with pytest.raises(DiceError, match="column 'prompt' must be"):
        tokenize_pairs([{"prompt": 3, "chosen": "w2", "rejected": "w3"}], tokenizer,
                       max_length=16, max_prompt_length=8)


def test_truncation_prompt_first_from_the_left_then_response_from_the_right():
    prompt, chosen, rejected = list(range(10, 30)), list(range(30, 42)), list(range(50, 55))
    # 20 + 12 > 24: the prompt keeps its LAST 8 tokens; 8 + 12 <= 24, responses intact.
    data, stats = build_pairs([(prompt, chosen, rejected)], max_length=24,
                              max_prompt_length=8, pad_to_multiple=8)
    row = data.input_ids[0, 0][data.attention_mask[0, 0] > 0]
    np.testing.assert_array_equal(row, prompt[-8:] + chosen)
    assert (stats.truncated_prompt, stats.truncated_response) == (1, 0)
    # keep_start keeps the first tokens instead.
    data, _ = build_pairs([(prompt, chosen, rejected)], max_length=24, max_prompt_length=8,
                          truncation_mode="keep_start")
    np.testing.assert_array_equal(data.input_ids[0, 0, :8], prompt[:8])
    # Still too long after cutting the prompt: responses cut to max_length - prompt.
    data, stats = build_pairs([(prompt, chosen, rejected)], max_length=16,
                              max_prompt_length=8, pad_to_multiple=8)
    assert data.length == 16 and (stats.truncated_prompt, stats.truncated_response) == (1, 1)
    row = data.input_ids[0, 0][data.attention_mask[0, 0] > 0]
    np.testing.assert_array_equal(row, prompt[-8:] + chosen[:8])
    assert data.loss_mask[0, 0].sum() == 8 and data.loss_mask[0, 1].sum() == 5
    # A short prompt is never cut even when the response is long.
    data, stats = build_pairs([([1, 2], list(range(3, 40)), [5])], max_length=16,
                              max_prompt_length=8)
    assert stats.truncated_prompt == 0 and data.input_ids[0, 0, :2].tolist() == [1, 2]


def test_read_rows_split_and_sampler(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "a", "chosen": "b", "rejected": str(i)})
                              for i in range(3)))
    assert len(read_rows(str(path))) == 3
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DiceError, match="not valid JSON"):
        read_rows(str(tmp_path / "bad.json"))
    data, _ = build_pairs([([1], [20 + i], [3]) for i in range(10)], max_length=8,
                          max_prompt_length=4)
    train, held = split_pairs(data, 3, seed=1)
    assert len(train) == 7 and len(held) == 3
    assert not set(train.input_ids[:, 0, 1]) & set(held.input_ids[:, 0, 1])
    sampler = PairSampler(10, 4, seed=0)
    assert sampler.steps_per_epoch == 2
    epoch0 = np.concatenate([sampler.indices(0), sampler.indices(1)])
    assert len(set(epoch0)) == 8
    np.testing.assert_array_equal(sampler.indices(3), PairSampler(10, 4, 0).indices(3))
    assert sampler.position(5) == (2, 1)
