"""An Ollama Modelfile for a GGUF export: the chat template turned into Ollama's Go template.

Jinja cannot be translated in general, so the template is rendered with marker messages to learn what
comes before and after each role's content and what opens the assistant's turn; those pieces become
a Go template. The stop parameters are the end-of-turn tokens.
"""

from __future__ import annotations

from pathlib import Path

MARK = "\x00CONTENT\x00"


def _render(tok, messages, generation_prompt: bool) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # noqa: BLE001 - templates raise for roles or orders they do not support
        return None


def role_parts(tok) -> tuple[dict[str, tuple[str, str]], str, str]:
    """({role: (before, after)}, text before the first message, text that opens the assistant's turn)."""
    empty = _render(tok, [], False) or ""
    parts = {}
    for role in ("system", "user", "assistant"):
        text = _render(tok, [{"role": role, "content": MARK}], False)
        if text is None or MARK not in text:
            continue
        before, after = text.split(MARK, 1)
        if before.startswith(empty):
            before = before[len(empty):]
        parts[role] = (before, after)
    user = [{"role": "user", "content": "x"}]
    with_prompt, without = _render(tok, user, True), _render(tok, user, False)
    opener = with_prompt[len(without):] if with_prompt and without and with_prompt.startswith(without) else ""
    return parts, empty, opener


def _go(text: str) -> str:
    return text.replace("{{", "{{ \"{{\" }}")


def modelfile(tok, gguf_name: str, system: str | None = None) -> str:
    parts, prefix, opener = role_parts(tok)
    bos = tok.bos_token or ""
    # llama.cpp adds bos itself: drop it from the template's start and from per-message pieces
    prefix = prefix[len(bos):] if bos and prefix.startswith(bos) else prefix
    parts = {r: (b[len(bos):] if bos and b.startswith(bos) else b, a) for r, (b, a) in parts.items()}
    branches = []
    for i, (role, (before, after)) in enumerate(parts.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go(before)}{{{{ .Content }}}}{_go(after)}')
    # No whitespace trimming ({{-): the newlines after each message are part of the format.
    body = "".join(branches) + ("{{ end }}" if branches else "")
    template = f"{_go(prefix)}{{{{ range .Messages }}}}{body}{{{{ end }}}}{_go(opener)}"
    stops = [t for t in {tok.eos_token, *(getattr(tok, "additional_special_tokens", None) or [])} if t and t != tok.bos_token]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: str | Path, out_dir: str | Path, gguf_name: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    path = Path(out_dir) / "Modelfile"
    path.write_text(modelfile(tok, gguf_name))
    return str(path)
