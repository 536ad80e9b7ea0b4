"""Write a Llama-family Hugging Face model as a GGUF file with the `gguf` package, as llama.cpp's
convert_hf_to_gguf.py does for `LlamaForCausalLM`:

- tensor names through gguf's own name map (`model.layers.N.self_attn.q_proj` -> `blk.N.attn_q`, ...);
- q_proj/k_proj rows permuted from Hugging Face's rotate-half RoPE layout to the interleaved layout
  llama.cpp's `llama` architecture expects (`permute_qk`);
- 1-D tensors (norms) stay f32; matrices are f32, f16 or bf16;
- tokenizer: byte-level BPE (`gpt2` model in GGUF; Llama 3 and GPT-2 style tokenizers) with merges,
  token types, special token ids and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from ..errors import BadRequest

LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
DTYPES = ("f32", "f16", "bf16")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved order (llama.cpp's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config) -> dict[str, tuple[str, torch.Tensor]]:
    """{gguf name: (hf name, tensor as written, before dtype conversion)}."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out = {}
    for hf_name, t in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        base, suffix = (hf_name[: -len(".weight")], ".weight") if hf_name.endswith(".weight") else (hf_name, "")
        name = name_map.get_name(base)
        if name is None:
            raise BadRequest(f"model: tensor {hf_name!r} has no GGUF name for the llama architecture")
        t = t.detach().float()
        if base.endswith("q_proj"):
            t = permute_qk(t, n_head)
        elif base.endswith("k_proj"):
            t = permute_qk(t, n_kv)
        out[name + suffix] = (hf_name, t)
    # Tied embeddings: safetensors holds no lm_head.weight, and llama.cpp reuses token_embd without output.weight.
    return out


def _tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> dict:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    spec = json.loads((model_dir / "tokenizer.json").read_text()) if (model_dir / "tokenizer.json").exists() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BadRequest(f"model: tokenizer of type {model.get('type')!r}"
                         f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}: "
                         "this exporter writes byte-level BPE tokenizers (Llama 3 / GPT-2 style) only")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    pre = json.dumps(spec.get("pre_tokenizer"))
    # llama.cpp picks its pre-tokenizer regex by name: Llama 3's split pattern, else GPT-2's byte-level one.
    tokenizer_pre = "llama-bpe" if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre else "gpt-2"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(model_dir), load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer)
    if tok.chat_template and not special.chat_template:
        writer.add_chat_template(tok.chat_template)
    return {"tokenizer_model": "gpt2", "tokenizer_pre": tokenizer_pre, "tokens": len(tokens),
            "merges": len(special.merges), "chat_template": bool(tok.chat_template or special.chat_template)}


def export_gguf(model_dir: str | Path, out_file: str | Path, dtype: str = "f16", name: str | None = None,
                base_model: str | None = None) -> dict:
    """Write `model_dir` (a full Llama-family model) as GGUF; returns a summary. `name`: the result's name
    (general.name); `base_model`: the base's hub id (general.base_model.0.*), as llama.cpp's converter writes."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model_dir, out_file = Path(model_dir), Path(out_file)
    if dtype not in DTYPES:
        raise BadRequest(f"gguf_dtype: {dtype!r} is not one of {DTYPES}")
    config = AutoConfig.from_pretrained(str(model_dir))
    archs = config.architectures or []
    if not any(a in LLAMA_ARCHS for a in archs):
        raise BadRequest(f"model: GGUF export covers Llama-family models ({LLAMA_ARCHS}), not {archs}")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise BadRequest(f"model: no safetensors weights in {model_dir}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(name or model_dir.name)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model.split("/")[-1])
        if "/" in base_model:
            writer.add_base_model_organization(0, base_model.split("/")[0])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0))
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(file_type)
    tokenizer = _tokenizer_metadata(writer, model_dir, config.vocab_size)
    tensors = gguf_tensors(state, config)
    for name, (_, t) in tensors.items():
        data = t.numpy().astype(np.float32)
        if data.ndim == 1 or dtype == "f32":  # norms stay f32, as in llama.cpp's converter
            writer.add_tensor(name, data)
        elif dtype == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(out_file), "bytes": out_file.stat().st_size, "dtype": dtype, "tensors": len(tensors),
            "architecture": "llama", **tokenizer}


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a GGUF file as float32 arrays in PyTorch's (row-major, out x in) shape."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        out[t.name] = data.astype(np.float32).reshape(shape)
    return out
