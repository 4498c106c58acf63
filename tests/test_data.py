"""The embedded default (litespark_hf.data): corpus split, tokenizer, generated SFT / DPO sets. Quick (CPU)."""

import pytest

from litespark_hf.data import (TASKS, dpo_dataset, iter_documents, list_files, load_corpus,
                               load_embedded_tokenizer, sft_dataset)


def test_corpus_order_and_split_are_deterministic_and_disjoint():
    files = list_files()
    assert len(files) > 100
    assert [f.relpath for f in files] == [f.relpath for f in list_files()]
    assert not any("site-packages" in f.relpath for f in files)
    train = [d["path"] for d in iter_documents("train", max_chars=300_000)]
    test = [d["path"] for d in iter_documents("test")]
    assert train and test and not set(train) & set(test)
    assert 0.005 < len(test) / len(files) < 0.05  # ~2% of the files are held out
    dd = load_corpus(max_train_chars=50_000, max_eval_chars=20_000)
    assert set(dd) == {"train", "test"} and "def " in "".join(dd["train"]["text"])
    with pytest.raises(ValueError, match="split"):
        next(iter_documents("validation"))


def test_embedded_tokenizer_round_trip_specials_and_chat_template():
    tok = load_embedded_tokenizer()
    assert len(tok) == 2048
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    code = "def f(x_1):\n    return {'a': x_1 + 1234}  # ok é\n"
    ids = tok(code, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == code
    assert len(ids) < len(code) / 1.5  # BPE merges learned from the stdlib actually compress code
    assert [tok.decode([i]) for i in tok("1234", add_special_tokens=False)["input_ids"]] == list("1234")
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|bos|><|user|>What is 2 + 3?<|end|><|assistant|>5<|end|>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>")
    # the assistant answer and its end token are marked for assistant-only loss
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "5<|end|>"


def test_sft_and_dpo_sets_verifiable_deterministic_heldout():
    a, b = sft_dataset(200, 40, seed=3), sft_dataset(200, 40, seed=3)
    assert a["train"]["messages"] == b["train"]["messages"]
    assert sft_dataset(200, 40, seed=4)["train"]["messages"] != a["train"]["messages"]
    train_q = {m[0]["content"] for m in a["train"]["messages"]}
    test_q = {m[0]["content"] for m in a["test"]["messages"]}
    assert len(train_q) == 200 and len(test_q) == 40 and not train_q & test_q
    assert set(a["train"]["task"]) == set(TASKS)
    for msgs, task, answer in zip(a["test"]["messages"], a["test"]["task"], a["test"]["answer"]):
        q = msgs[0]["content"]
        assert msgs[1]["content"] == answer
        if task == "add":
            x, y = q.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(answer) == int(x) + int(y)
        elif task == "max":
            x, y = q.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
            assert int(answer) == max(int(x), int(y))
        elif task == "next":
            assert int(answer) == int(q.removeprefix("What number comes after ").removesuffix("?")) + 1
        else:
            assert answer == q.removeprefix("Repeat the words: ")
    d = dpo_dataset(100, 20, seed=5)
    assert d["train"].column_names[:3] == ["prompt", "chosen", "rejected"]
    assert all(c[0]["content"] != r[0]["content"] for c, r in zip(d["train"]["chosen"], d["train"]["rejected"]))
    assert not {p[0]["content"] for p in d["train"]["prompt"]} & {p[0]["content"] for p in d["test"]["prompt"]}
