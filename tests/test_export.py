"""Export: GGUF written with the `gguf` package and read back tensor by tensor, the Ollama Modelfile, a
LoRA adapter merged into a full model (same logits), and the Hub push as a dry run. The llama.cpp
logits comparison is opt-in (TRL_TEST_LLAMA_CPP=1 with llama-cpp-python installed: it builds from source)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from providers.export import export_model, push_to_hub
from providers.export.gguf_export import export_gguf, gguf_tensors, permute_qk, read_gguf_tensors


@pytest.fixture(scope="module")
def teacher_gguf(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(tiny_models["teacher"], out / f"teacher-{dt}.gguf", dt) for dt in ("f32", "f16", "bf16")}


def hf_state(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.parametrize("dtype,tolerance", [("f32", 0.0), ("f16", 1e-3), ("bf16", 1e-2)])
def test_every_gguf_tensor_equals_the_hf_weight(tiny_models, teacher_gguf, dtype, tolerance):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["teacher"])
    state = hf_state(tiny_models["teacher"])
    back = read_gguf_tensors(teacher_gguf[dtype]["path"])
    expected = gguf_tensors(state, config)
    assert set(back) == set(expected) and len(back) == len(state) == 4 * 9 + 3
    for name, (hf_name, tensor) in expected.items():
        got = back[name]
        assert got.shape == tuple(tensor.shape), name
        # relative to the tensor's scale: f16 keeps ~11 bits of mantissa, bf16 ~8
        err = float(np.abs(got - tensor.numpy()).max() / max(float(tensor.abs().max()), 1e-12))
        assert err <= tolerance, (name, hf_name, err)
    # q/k rows are in llama.cpp's interleaved RoPE order; everything else is the HF tensor as it is
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert np.allclose(back["blk.0.attn_q.weight"], permute_qk(q, config.num_attention_heads).numpy(), atol=1e-6 if dtype == "f32" else 1e-2)
    assert not np.allclose(back["blk.0.attn_q.weight"], q.numpy(), atol=1e-3)
    assert np.array_equal(back["token_embd.weight"], state["model.embed_tokens.weight"].numpy()) or dtype != "f32"


def test_gguf_metadata_and_tokenizer(tiny_models, teacher_gguf):
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(teacher_gguf["f16"]["path"])
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.merges"]) > 100
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == int(gguf.TokenType.CONTROL) and types[100] == int(gguf.TokenType.NORMAL)
    # norms stay f32 in an f16 file, as llama.cpp's converter writes them
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16


def gguf_llama_logits(path, ids, tensors=None):
    """llama.cpp's `llama` forward in numpy on the GGUF tensors: interleaved (NORM) RoPE on adjacent pairs."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    t = read_gguf_tensors(path) if tensors is None else tensors
    n_head, n_kv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    eps, base, hd = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"], f["llama.rope.dimension_count"]

    def norm(x, w):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # x: (T, heads, hd); rotate (x[2i], x[2i+1]) by pos * base^(-2i/hd)
        T = x.shape[0]
        ang = np.arange(T)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    x = t["token_embd.weight"][ids].astype(np.float64)
    T = len(ids)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(f["llama.block_count"]):
        def p(n, i=i):
            return t[f"blk.{i}.{n}.weight"].astype(np.float64)

        h = norm(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).reshape(T, n_head, hd))
        k = rope((h @ p("attn_k").T).reshape(T, n_kv, hd)).repeat(n_head // n_kv, axis=1)
        v = (h @ p("attn_v").T).reshape(T, n_kv, hd).repeat(n_head // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", a, v).reshape(T, -1) @ p("attn_output").T
        h = norm(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    return norm(x, t["output_norm.weight"]) @ t["output.weight"].T.astype(np.float64)


@pytest.mark.slow  # exports a GGUF and runs its forward in numpy: ~8 s
def test_gguf_computes_the_hf_logits_under_llama_cpp_rope(tiny_models, teacher_gguf):
    """llama.cpp's `llama` forward (adjacent-pair RoPE), in numpy on the file's tensors, gives the
    transformers logits; with q/k left in HF order it would not (so the check sees the permutation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse: a b c d"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()(torch.tensor([ids])).logits[0].double().numpy()
    got = gguf_llama_logits(teacher_gguf["f32"]["path"], ids)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max() and (got.argmax(-1) == want.argmax(-1)).all()
    unpermuted = read_gguf_tensors(teacher_gguf["f32"]["path"])
    for name, t in hf_state(tiny_models["teacher"]).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            layer, proj = name.split(".")[2], "attn_q" if "q_proj" in name else "attn_k"
            unpermuted[f"blk.{layer}.{proj}.weight"] = t.numpy()
    wrong = gguf_llama_logits(teacher_gguf["f32"]["path"], ids, unpermuted)
    assert np.abs(wrong - want).max() > 1e-2 * np.abs(want).max()
    f16 = gguf_llama_logits(teacher_gguf["f16"]["path"], ids)
    assert (f16.argmax(-1) == want.argmax(-1)).mean() > 0.9


def lora_adapter(student: str, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, so merging changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(student).save_pretrained(str(out))
    return out


def test_adapter_export_merged_gguf_modelfile_and_hub_dry_run(tiny_models, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    adapter = lora_adapter(tiny_models["student"], tmp_path / "adapter")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "validation.json").write_text(json.dumps(
        {"passed": True, "summary": {"pass_rate": 0.5, "base_pass_rate": 0.0, "perplexity": 3.0, "base_perplexity": 9.0}}))
    (tmp_path / "val" / "validation.md").write_text("# ok\n")
    summary = export_model(str(adapter), str(tmp_path / "out"), ["merged", "gguf", "hub"], "f32",
                           hub={"repo_id": "me/tiny-adapter"}, card={"method": "sft", "data": {"rows": 10}},
                           validation_dir=str(tmp_path / "val"))

    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        want = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(summary["merged"]["path"]).eval()
        got = merged(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-3)

    back = read_gguf_tensors(summary["gguf"]["path"])
    merged_state = {k: v for k, v in merged.state_dict().items()}
    for name, (hf_name, t) in gguf_tensors(merged_state, merged.config).items():
        assert np.allclose(back[name], t.numpy(), atol=1e-6), name

    modelfile = Path(summary["gguf"]["modelfile"]).read_text()
    gguf_name = Path(summary["gguf"]["path"]).name
    assert modelfile.startswith(f"FROM ./{gguf_name}\n")
    assert 'eq .Role "user" }}<|user|>\n{{ .Content }}\n{{ else if' in modelfile
    assert '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}</s>' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile

    hub = summary["hub"]
    assert hub["dry_run"] is True and hub["repo_id"] == "me/tiny-adapter"
    files = {f["path"] for f in hub["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "validation.json"} <= files
    card = (tmp_path / "out" / "hub" / "README.md").read_text()
    assert "library_name: peft" in card and "| held-out pass rate | 0.500 | 0.000 |" in card and "- rows: 10" in card
    assert json.loads((tmp_path / "out" / "export.json").read_text())["formats"] == ["merged", "gguf", "hub"]


def test_hub_push_uploads_only_with_a_token(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    plan = push_to_hub(tmp_path / "m", "me/x", {"method": "sft"})
    assert plan["dry_run"] and (tmp_path / "m" / "hub_upload_plan.json").exists()
    assert [f["path"] for f in plan["files"]] == ["README.md", "config.json"]


def test_non_llama_and_bad_dtype_are_refused(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="gguf_dtype"):
        export_gguf(tiny_models["teacher"], tmp_path / "x.gguf", "q4")
    cfg = json.loads((Path(tiny_models["teacher"]) / "config.json").read_text())
    fake = tmp_path / "gpt2ish"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="Llama-family"):
        export_gguf(fake, tmp_path / "y.gguf")


@pytest.mark.skipif(os.environ.get("TRL_TEST_LLAMA_CPP") != "1", reason="opt-in: TRL_TEST_LLAMA_CPP=1 and "
                    "`pip install llama-cpp-python` (builds llama.cpp from source, slow)")
def test_llama_cpp_logits_match_transformers(tiny_models, teacher_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse: a b c"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    llm = llama_cpp.Llama(model_path=teacher_gguf["f32"]["path"], logits_all=True, n_ctx=64, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("on_hub", [True, False], ids=["hub-base", "local-base"])
def test_exports_are_named_after_the_result_and_the_bases_hub_id(tiny_models, tmp_path, on_hub):
    """GGUF file, GGUF general.name, Ollama name and model card carry the result's name (not `final`) and the
    base's hub id (not this machine's path); a base only on this machine is named, never by its path."""
    import gguf
    import shutil

    base = tmp_path / ("hub/models--tiny-org--student/snapshots/0123abc" if on_hub else "models/student")
    shutil.copytree(tiny_models["student"], base)
    final = lora_adapter(str(base), tmp_path / "runs" / "reverse-sft" / "checkpoints" / "final")
    summary = export_model(str(final), str(tmp_path / "out"), ["gguf", "hub"], "f32")

    gguf_file = Path(summary["gguf"]["path"])
    assert gguf_file.name == "reverse-sft-f32.gguf" and summary["name"] == "reverse-sft"
    assert summary["gguf"]["ollama_name"] == "reverse-sft:f32"
    assert Path(summary["gguf"]["modelfile"]).read_text().startswith("FROM ./reverse-sft-f32.gguf\n")
    fields = gguf.GGUFReader(str(gguf_file)).fields

    def text(key):
        return bytes(fields[key].parts[fields[key].data[0]]).decode() if key in fields else None

    assert text("general.name") == "reverse-sft"
    card = (tmp_path / "out" / "hub" / "README.md").read_text()
    assert summary["hub"]["repo_id"] == "local/reverse-sft" and "\n# reverse-sft\n" in card
    assert str(tmp_path) not in card
    if on_hub:
        assert summary["base_model_id"] == "tiny-org/student"
        assert "base_model: tiny-org/student" in card and "https://huggingface.co/tiny-org/student" in card
        assert text("general.base_model.0.repo_url") == "https://huggingface.co/tiny-org/student"
    else:
        assert summary["base_model_id"] is None and "base_model:" not in card
        assert "the local model `student` (not on the Hub)" in card
        assert text("general.base_model.0.repo_url") is None
