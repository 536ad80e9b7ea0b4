"""The serving engine in-process: LRU of loaded models, streaming deltas, stop strings, adapters."""

from __future__ import annotations

from pathlib import Path

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


def _adapter(tiny_models, out, seed: int, peft=None) -> str:
    """An adapter of the teacher; by default LoRA with random weights, scaled up: its answers are not the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = peft or LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]), peft)
    model.save_pretrained(str(out))
    return str(out)


def _weights(loaded) -> set[int]:
    """Where the base's own weights (no adapter's) of a loaded model lie in memory."""
    return {p.data_ptr() for n, p in loaded.model.named_parameters() if "lora_" not in n and "prefix" not in n}


def test_adapters_of_one_base_share_its_one_loaded_copy(tiny_models, tmp_path):
    from peft import PrefixTuningConfig

    base = tiny_models["teacher"]
    paths = {"base": base, "a": _adapter(tiny_models, tmp_path / "a", 1), "b": _adapter(tiny_models, tmp_path / "b", 2)}
    alone = {name: generate(load_for_inference(path), QUESTION, 4).text for name, path in paths.items()}
    assert len(set(alone.values())) == 3  # three different models
    cache = ModelCache(capacity=3)
    for name in ["a", "base", "b", "a", "b", "base"]:  # each request switches from the one before
        assert generate(cache.get(paths[name]), QUESTION, 4).text == alone[name], name
    loaded = [cache.get(p) for p in paths.values()]
    assert _weights(loaded[0]) == _weights(loaded[1]) == _weights(loaded[2])  # one copy of the base, not three

    cache.get(_adapter(tiny_models, tmp_path / "c", 3))  # evicts the base entry: a and b still use its weights
    assert str(Path(base).resolve()) not in cache.loaded()
    cache.get(_adapter(tiny_models, tmp_path / "d", 4))  # evicts a; b keeps the base
    assert generate(cache.get(paths["b"]), QUESTION, 4).text == alone["b"]
    again = cache.get(base)  # back from the memory b holds, not loaded again
    assert _weights(again) == _weights(loaded[0]) and generate(again, QUESTION, 4).text == alone["base"]
    assert generate(loaded[1], QUESTION, 4).text == alone["a"]  # a request that got a before its eviction
    assert len(again.shared.peft.peft_config) == 2  # b and d: the evicted adapters' weights are gone

    prefix = _adapter(tiny_models, tmp_path / "prefix", 5, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=4))
    own = cache.get(prefix)  # prefix tuning lives on its PeftModel: its own copy of the base
    assert _weights(own).isdisjoint(_weights(again)) and generate(own, QUESTION, 4).completion_tokens > 0
