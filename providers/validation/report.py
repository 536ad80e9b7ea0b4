"""Validate a trained checkpoint (PEFT adapter or full model) against its base model.

Checks, each with its own `passed`:
1. files: config, weights (safetensors, loadable, finite), tokenizer and chat template present and loadable
2. inference: the model loads and generates
3. prompts: each held-out prompt's response, and whether it passed (expected answer / substrings)
4. comparison with the base: both responses side by side, held-out perplexity of both on the expected
   answers, how many outputs changed and how much (character similarity)
5. performance: generation tokens/s and the process's peak memory

Writes OUT_DIR/validation.json (with an overall `passed` and the `verdict` behind it: sample size, pass
rates with exact 95% intervals, the paired test against the base; see verdict.py) and OUT_DIR/validation.md.
"""

from __future__ import annotations

import difflib
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..enhance.judges import normalize
from ..serving.engine import adapter_base, generate, is_adapter, load_for_inference, prompt_ids
from ..training.data import DataFormatError, completion_row, prompt_row
from .verdict import verdict


def parse_prompt(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A held-out row: its prompt messages, optional `expected` answer and `expected_substrings`."""
    prompt = prompt_row(row, index)["prompt"]
    expected = row.get("expected")
    if expected is None:
        try:
            expected = completion_row(row, index)["completion"][-1]["content"]
        except DataFormatError:
            expected = None
    subs = row.get("expected_substrings") or ([row["expected_substring"]] if row.get("expected_substring") else [])
    return {"prompt": prompt, "expected": expected, "expected_substrings": list(subs)}


def check_files(path: Path) -> dict[str, Any]:
    """Presence and loadability of the checkpoint's files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    checks: dict[str, Any] = {}
    adapter = is_adapter(path)
    config_file = path / ("adapter_config.json" if adapter else "config.json")
    try:
        config = json.loads(config_file.read_text())
        if not adapter:
            AutoConfig.from_pretrained(str(path))
        checks["config"] = {"passed": True, "file": config_file.name,
                            "detail": config.get("peft_type") or config.get("model_type")}
    except Exception as e:  # noqa: BLE001 - reported
        checks["config"] = {"passed": False, "file": config_file.name, "detail": f"{type(e).__name__}: {e}"}
    weights = sorted(path.glob("adapter_model.safetensors" if adapter else "*.safetensors"))
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    detail, ok, tensors = "", bool(weights), 0
    try:
        for w in weights:
            with safe_open(str(w), "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    tensors += 1
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        ok, detail = False, f"{w.name}: {name} has non-finite values"
    except Exception as e:  # noqa: BLE001 - reported
        ok, detail = False, f"{type(e).__name__}: {e}"
    checks["weights"] = {"passed": ok, "files": [w.name for w in weights], "tensors": tensors,
                         "bytes": sum(w.stat().st_size for w in weights),
                         "detail": detail or ("no safetensors weights" if not weights else "all tensors finite"),
                         "pickle_files_ignored": pickled}
    tok_dir = path if (path / "tokenizer_config.json").exists() or not adapter else Path(adapter_base(path))
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        checks["tokenizer"] = {"passed": True, "dir": str(tok_dir), "vocab_size": len(tok)}
        template = tok.chat_template
        if template:
            tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        checks["chat_template"] = {"passed": bool(template),
                                   "detail": "renders" if template else "no chat template in the tokenizer"}
    except Exception as e:  # noqa: BLE001 - reported
        checks["tokenizer"] = {"passed": False, "dir": str(tok_dir), "detail": f"{type(e).__name__}: {e}"}
        checks["chat_template"] = {"passed": False, "detail": "tokenizer did not load"}
    if adapter:
        base = adapter_base(path)
        checks["base_model"] = {"passed": (Path(base) / "config.json").is_file(), "path": base}
    return {"passed": all(c["passed"] for c in checks.values()), **checks}


def passes(response: str, expected: str | None, substrings: list[str], match: str) -> bool | None:
    """None when the prompt states nothing to check."""
    if expected is None and not substrings:
        return None
    ok = all(s in response for s in substrings)
    if expected is not None:
        if match == "exact":
            ok = ok and response.strip() == expected.strip()
        elif match == "normalized":
            ok = ok and normalize(response) == normalize(expected)
        else:  # contains
            ok = ok and normalize(expected) in normalize(response)
    return ok


@torch.no_grad()
def answer_perplexity(loaded, items: list[dict[str, Any]]) -> float | None:
    """exp(mean NLL) of the expected answers (+ eos) given their prompts, over all answer tokens."""
    total, count = 0.0, 0
    tok = loaded.tokenizer
    for it in items:
        if it["expected"] is None:
            continue
        p = prompt_ids(loaded, it["prompt"])
        answer = tok(it["expected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + answer], device=loaded.model.device)
        logits = loaded.model(input_ids=ids).logits[0, -len(answer) - 1 : -1].float().cpu()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    return math.exp(total / count) if count else None


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_prompts(loaded, items: list[dict[str, Any]], max_new_tokens: int) -> tuple[list[str], dict[str, float]]:
    responses, tokens, seconds = [], 0, 0.0
    for it in items:
        t0 = time.perf_counter()
        c = generate(loaded, it["prompt"], max_new_tokens, temperature=0.0)
        seconds += time.perf_counter() - t0
        tokens += c.completion_tokens
        responses.append(c.text)
    return responses, {"generated_tokens": tokens, "seconds": round(seconds, 4),
                       "tokens_per_s": round(tokens / seconds, 2) if seconds else None}


def validate_model(model: str, out_dir: str, prompts: list[dict[str, Any]], base_model: str | None = None,
                   max_new_tokens: int = 64, match: str = "normalized", min_pass_rate: float | None = None,
                   compare_base: bool = True, alpha: float | None = None) -> dict[str, Any]:
    """Write validation.json and validation.md for `model` (an adapter's base is its base model unless
    `base_model` is given); returns the report. `passed` needs files, inference, a pass rate of at least
    `min_pass_rate` (default 0.5) and, against a base, a significant gain (p < `alpha`, default 0.05): see
    verdict.py."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(model)
    started = time.time()
    items = [parse_prompt(r, i) for i, r in enumerate(prompts)]
    report: dict[str, Any] = {"model": str(path), "adapter": is_adapter(path), "started_at": started}
    base = base_model or (adapter_base(path) if is_adapter(path) else None)
    report["base_model"] = base
    report["files"] = check_files(path)
    rss_before = _peak_rss_mb()
    try:
        t0 = time.perf_counter()
        loaded = load_for_inference(path)
        load_s = time.perf_counter() - t0
        smoke = generate(loaded, items[0]["prompt"] if items else [{"role": "user", "content": "Hello"}], 8)
        # A model that answers nothing at all does not work, whatever it loaded.
        report["inference"] = {"passed": smoke.completion_tokens > 0 and bool(smoke.text.strip()),
                               "load_s": round(load_s, 3), "sample": smoke.text,
                               "sample_tokens": smoke.completion_tokens}
    except Exception as e:  # noqa: BLE001 - reported: a model that does not load fails validation
        report["inference"] = {"passed": False, "detail": f"{type(e).__name__}: {e}"}
        return _finish(report, out, min_pass_rate, alpha)
    responses, perf = run_prompts(loaded, items, max_new_tokens)
    ppl = answer_perplexity(loaded, items)
    report["performance"] = {**perf, "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_load_mb": round(rss_before, 1),
                             "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                             if torch.cuda.is_available() else None,
                             "parameters": sum(p.numel() for p in loaded.model.parameters())}
    base_responses = [None] * len(items)
    base_ppl = None
    if base and compare_base:
        base_loaded = load_for_inference(base)
        base_responses, base_perf = run_prompts(base_loaded, items, max_new_tokens)
        base_ppl = answer_perplexity(base_loaded, items)
        report["performance"]["base_tokens_per_s"] = base_perf["tokens_per_s"]
        del base_loaded
    rows = []
    for it, resp, base_resp in zip(items, responses, base_responses):
        row = {"prompt": it["prompt"], "expected": it["expected"], "expected_substrings": it["expected_substrings"],
               "response": resp, "passed": passes(resp, it["expected"], it["expected_substrings"], match)}
        if base_resp is not None:
            row.update(base_response=base_resp,
                       base_passed=passes(base_resp, it["expected"], it["expected_substrings"], match),
                       changed=resp != base_resp,
                       similarity=round(difflib.SequenceMatcher(None, resp, base_resp).ratio(), 4))
        rows.append(row)
    report["prompts"] = rows
    checked = [r for r in rows if r["passed"] is not None]
    summary = {"prompts": len(rows), "checked": len(checked), "match": match,
               "pass_rate": sum(r["passed"] for r in checked) / len(checked) if checked else None,
               "perplexity": ppl}
    if base and compare_base:
        summary.update(
            base_pass_rate=sum(bool(r["base_passed"]) for r in checked) / len(checked) if checked else None,
            base_perplexity=base_ppl,
            changed_share=sum(r["changed"] for r in rows) / len(rows) if rows else None,
            mean_similarity_to_base=sum(r["similarity"] for r in rows) / len(rows) if rows else None,
        )
    report["summary"] = summary
    return _finish(report, out, min_pass_rate, alpha)


def _finish(report: dict[str, Any], out: Path, min_pass_rate: float | None,
            alpha: float | None = None) -> dict[str, Any]:
    s = report.get("summary", {})
    gates = {"files": report["files"]["passed"], "inference": report["inference"]["passed"]}
    if "prompts" in report:
        checked = [r for r in report["prompts"] if r["passed"] is not None]
        compared = bool(checked) and all("base_passed" in r for r in checked) and "base_pass_rate" in s
        v = verdict([r["passed"] for r in checked], [bool(r["base_passed"]) for r in checked] if compared else None,
                    min_pass_rate, alpha)
        report["verdict"] = v
        report["pass_rate_floor"] = v["min_pass_rate"]
        gates["pass_rate"] = v["meets_bar"]
        if v["significant"] is not None:
            gates["improvement"] = v["significant"]
    report["gates"] = gates
    report["passed"] = all(gates.values())
    report["elapsed_s"] = round(time.time() - report.pop("started_at"), 3)
    (out / "validation.json").write_text(json.dumps(report, indent=2))
    (out / "validation.md").write_text(markdown(report))
    return report


def _cell(text: Any, width: int = 80) -> str:
    s = "" if text is None else str(text)
    s = s.replace("|", "\\|").replace("\n", " ⏎ ")
    return s if len(s) <= width else s[: width - 1] + "…"


def markdown(report: dict[str, Any]) -> str:
    s = report.get("summary", {})
    lines = [f"# Validation of `{report['model']}`", "",
             f"**{'PASSED' if report['passed'] else 'FAILED'}** "
             f"({', '.join(k + (': ok' if v else ': failed') for k, v in report['gates'].items())})", "",
             f"- kind: {'PEFT adapter' if report['adapter'] else 'full model'}; base: `{report.get('base_model')}`"]
    v = report.get("verdict")
    if v:
        def ci(c):
            return "" if not c else f" (95% CI {c[0]:.0%}-{c[1]:.0%})"

        lines += ["", "## Verdict", "", f"- {v['reason']}",
                  f"- sample: {v['n']} prompts with an expected answer; pass rate "
                  + ("n/a" if v["pass_rate"] is None else f"{v['pass_rate']:.1%}{ci(v['pass_rate_ci95'])}")
                  + f"; bar {v['min_pass_rate']:.0%}" + (" (default)" if v["min_pass_rate_is_default"] else "")]
        if v["p_value"] is not None and v["n"]:
            lines.append(f"- base pass rate {v['base_pass_rate']:.1%}{ci(v.get('base_pass_rate_ci95'))}; "
                         f"only the model passed {v['wins']}, only the base {v['losses']}; one-sided exact "
                         f"McNemar p = {v['p_value']:.3g} (alpha {v['alpha']:g})")
        lines.append(f"- rule: {v['rule']}")
    if s:
        def pct(v):
            return "n/a" if v is None else f"{v:.0%}"

        def num(v):
            return "n/a" if v is None else f"{v:.3f}"

        lines += ["", "## Summary", "", "| | model | base |", "|---|---|---|",
                  f"| pass rate ({s['match']}, {s['checked']} prompts) | {pct(s['pass_rate'])} | {pct(s.get('base_pass_rate'))} |",
                  f"| held-out perplexity | {num(s['perplexity'])} | {num(s.get('base_perplexity'))} |"]
        if s.get("changed_share") is not None:
            lines.append(f"| outputs changed vs base | {pct(s['changed_share'])} "
                         f"(mean similarity {s['mean_similarity_to_base']:.2f}) | |")
    lines += ["", "## Files", ""]
    for name, c in report["files"].items():
        if name != "passed":
            lines.append(f"- {name}: {'ok' if c['passed'] else 'FAILED'} {_cell(c.get('detail') or c.get('files') or c.get('path') or '', 120)}")
    inf = report["inference"]
    lines += ["", "## Inference", "", f"- {'ok' if inf['passed'] else 'FAILED'}: {_cell(inf.get('sample', inf.get('detail')), 120)}"]
    if "performance" in report:
        p = report["performance"]
        lines += ["", "## Performance", "", f"- generation: {p['tokens_per_s']} tokens/s ({p['generated_tokens']} tokens)"
                  + (f"; base {p['base_tokens_per_s']} tokens/s" if p.get("base_tokens_per_s") else ""),
                  f"- peak memory (process RSS): {p['peak_rss_mb']} MB" + (f"; CUDA peak {p['cuda_peak_mb']} MB" if p.get("cuda_peak_mb") else "")]
    if report.get("prompts"):
        lines += ["", "## Prompts", "", "| # | prompt | expected | response | pass | base response | base pass |",
                  "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(report["prompts"]):
            def mark(v):
                return "-" if v is None else ("yes" if v else "no")
            lines.append(f"| {i} | {_cell(r['prompt'][-1]['content'], 40)} | {_cell(r['expected'], 30)} | "
                         f"{_cell(r['response'], 40)} | {mark(r['passed'])} | {_cell(r.get('base_response'), 40)} | "
                         f"{mark(r.get('base_passed'))} |")
    return "\n".join(lines) + "\n"
