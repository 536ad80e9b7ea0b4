"""The serving engine in-process: LRU of loaded models, streaming deltas, stop strings, adapters."""

from __future__ import annotations

import pytest

from providers.serving.engine import Completion, ModelCache, _held_back, generate, generate_stream, load_for_inference

QUESTION = [{"role": "user", "content": "reverse: a b c d"}]


def test_lru_keeps_the_most_recently_used(tiny_models):
    cache = ModelCache(capacity=1)
    teacher = cache.get(tiny_models["teacher"])
    assert cache.get(tiny_models["teacher"]) is teacher  # loaded once
    cache.get(tiny_models["student"])
    assert [p.rsplit("/", 1)[-1] for p in cache.loaded()] == ["student"]
    with pytest.raises(ValueError, match="neither a model directory"):
        cache.get(str(tiny_models["student"]) + "/..")  # the models root itself: no model there


def test_stream_is_the_completion_in_pieces(tiny_models):
    loaded = load_for_inference(tiny_models["teacher"])
    items = list(generate_stream(loaded, QUESTION, 12))
    final = items[-1]
    assert isinstance(final, Completion) and final.text == "d c b a" and final.finish_reason == "stop"
    assert "".join(items[:-1]) == final.text and len(items) > 2
    cut = list(generate_stream(loaded, QUESTION, 12, stop=[" b a"]))
    assert "".join(cut[:-1]) == cut[-1].text == "d c"  # no piece of the stop string was streamed
    assert generate(loaded, QUESTION, 2).finish_reason == "length"


def test_partial_stop_strings_are_held_back():
    assert _held_back("answer: x</", ["</s>"]) == 2
    assert _held_back("answer: x", ["</s>"]) == 0
    assert _held_back("ab", ["abc", "bcd"]) == 2


def test_adapter_over_its_base(tiny_models, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: same answers as the base
    model.save_pretrained(str(tmp_path / "adapter"))
    AutoTokenizer.from_pretrained(tiny_models["teacher"]).save_pretrained(str(tmp_path / "adapter"))
    loaded = load_for_inference(tmp_path / "adapter")
    assert loaded.base_model == tiny_models["teacher"]
    assert generate(loaded, QUESTION, 12).text == "d c b a"
