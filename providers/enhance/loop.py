"""The enhancement loop, per row: the student answers; the judge checks; while wrong and attempts are
left, the teacher hints and the student tries again. Results are appended per row to results.jsonl, so
a run that stops (cancel, crash, restart) resumes with the rows it has not finished."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..outbound import Endpoint
from ..training.data import DataFormatError, completion_row, prompt_row
from .config import EnhanceConfig, ModelJudgeConfig
from .judges import parse_model_verdict, rule_verdict
from .roles import ChatRole
from .templates import TemplateTooLarge, render

RESULTS, DATASET, PREFERENCES, REPORT = "results.jsonl", "enhanced_dataset.jsonl", "preferences.jsonl", "enhancement_report.json"


def parse_row(row: dict[str, Any], index: int) -> tuple[list[dict], str | None, dict]:
    """(prompt messages, reference answer or None, metadata) of a row as users have it: `messages` (a
    trailing assistant message is the reference), instruct rows with `expected_answer`, prompt/completion,
    or a reference in `metadata.answer` / `answer` / `reference`."""
    prompt = prompt_row(row, index)["prompt"]
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    for source, key in [(metadata, "reference"), (metadata, "answer"), (metadata, "expected_answer"),
                        (row, "reference"), (row, "answer")]:
        if isinstance(source.get(key), str | int | float) and not isinstance(source.get(key), bool):
            return prompt, str(source[key]), metadata
    try:
        reference = completion_row(row, index)["completion"][-1]["content"]
    except DataFormatError:
        reference = None
    return prompt, reference, metadata


def _question(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


class Enhancer:
    def __init__(self, config: EnhanceConfig, student: ChatRole, teacher: ChatRole, judge: ChatRole | None):
        self.config, self.student, self.teacher, self.judge = config, student, teacher, judge

    async def verdict(self, prompt: list[dict], answer: str, reference: str | None) -> tuple[bool, str]:
        cfg = self.config.judge
        if isinstance(cfg, ModelJudgeConfig):
            text = render(cfg.template, {"question": _question(prompt), "reference": reference or "(none)",
                                         "answer": answer}, "judge.template")
            reply = await self.judge.chat([{"role": "user", "content": text}])
            ok = parse_model_verdict(reply)
            return bool(ok), reply if ok is not None else f"unparsable verdict, counted incorrect: {reply!r}"
        return rule_verdict(cfg, answer, reference or "")

    async def row(self, index: int, prompt: list[dict], reference: str | None, metadata: dict) -> dict[str, Any]:
        cfg = self.config
        thinking: list[dict[str, Any]] = []
        conversation = list(prompt)
        correct, answer = False, ""
        for iteration in range(1, cfg.max_iterations + 1):
            answer, reasoning = await self.student.reply(conversation)
            correct, why = await self.verdict(prompt, answer, reference)
            step = {"iteration": iteration, "attempt": answer, "correct": correct, "verdict": why}
            if reasoning:
                step["reasoning"] = reasoning
            thinking.append(step)
            if correct or iteration == cfg.max_iterations:
                break
            hint_prompt = render(cfg.hint_template, {"question": _question(prompt), "reference": reference or "(none)",
                                                     "answer": answer}, "hint_template")
            hint = await self.teacher.chat([{"role": "user", "content": hint_prompt}])
            step["hint"] = hint
            conversation += [{"role": "assistant", "content": answer},
                             {"role": "user", "content": render(cfg.retry_template, {"hint": hint}, "retry_template")}]
        source = "student" if correct else None
        final = answer
        if not correct and cfg.on_failure == "teacher_answer":
            teacher_answer, reasoning = await self.teacher.reply(list(prompt))
            ok, why = await self.verdict(prompt, teacher_answer, reference)
            thinking.append({"iteration": "teacher", "attempt": teacher_answer, "correct": ok, "verdict": why,
                             **({"reasoning": reasoning} if reasoning else {})})
            if ok:
                correct, final, source = True, teacher_answer, "teacher"
        keep = correct or cfg.on_failure == "keep"
        return {
            "index": index, "prompt": prompt, "reference": reference, "metadata": metadata,
            "final_answer": final, "correct": correct, "source": source or "student",
            "iterations": sum(1 for t in thinking if t["iteration"] != "teacher"),
            "thinking": thinking, "kept": keep, "dropped_reason": None if keep else "never correct",
        }


def thinking_text(result: dict[str, Any]) -> str:
    """The iterations as readable text: each attempt, the judge's verdict and the teacher's hint."""
    lines = []
    for t in result["thinking"]:
        who = "Teacher's answer" if t["iteration"] == "teacher" else f"Attempt {t['iteration']}"
        lines.append(f"{who}: {t['attempt']}")
        lines.append(f"Judge: {'correct' if t['correct'] else 'incorrect'} ({t['verdict']})")
        if t.get("hint"):
            lines.append(f"Hint: {t['hint']}")
    return "\n".join(lines)


def accepted_reasoning(result: dict[str, Any]) -> str | None:
    """The reasoning that came with the accepted answer (the successful attempt's, or the teacher's), if any."""
    if not result["correct"]:
        return None
    accepted = [t for t in result["thinking"] if t["correct"] and t["attempt"] == result["final_answer"]]
    step = accepted[-1] if accepted else None
    return step.get("reasoning") if step else None


def sft_row(result: dict[str, Any], thinking_format: str, output_format: str) -> dict[str, Any]:
    """The training row of one result. `final`: the accepted answer, after the reasoning that produced it
    (in `<think>`) where the model returned any; `final-only`: the answer alone; `iterative`: every attempt,
    verdict and hint in `<think>` before the answer (trains on the rejected attempts too)."""
    answer = result["final_answer"]
    if thinking_format == "iterative" and len(result["thinking"]) > 1:
        answer = f"<think>\n{thinking_text(result)}\n</think>\n{answer}"
    elif thinking_format == "final" and (reasoning := accepted_reasoning(result)):
        answer = f"<think>\n{reasoning}\n</think>\n{answer}"
    meta = {**result["metadata"], "enhancement": {"correct": result["correct"], "source": result["source"],
                                                   "iterations": result["iterations"]}}
    prompt = result["prompt"]
    if output_format == "instruct" and len(prompt) == 1 and prompt[0]["role"] == "user":
        return {"input_query": prompt[0]["content"], "expected_answer": answer, "metadata": meta}
    return {"messages": [*prompt, {"role": "assistant", "content": answer}], "metadata": meta}


def read_results(out_dir: Path) -> dict[int, dict[str, Any]]:
    """The last result of every row (a line cut short by a crash is ignored)."""
    results: dict[int, dict[str, Any]] = {}
    path = out_dir / RESULTS
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[r["index"]] = r
    return results


def build_artifacts(out_dir: Path, config: EnhanceConfig, total_rows: int, stats: dict[str, Any] | None = None) -> dict:
    """enhanced_dataset.jsonl, preferences.jsonl and enhancement_report.json from results.jsonl."""
    results = [r for _, r in sorted(read_results(out_dir).items())]
    ok = [r for r in results if not r.get("error") and r["thinking"]]  # judged rows
    with open(out_dir / DATASET, "w") as f:
        for r in ok:
            if r["kept"]:
                f.write(json.dumps(sft_row(r, config.thinking_format, config.output_format)) + "\n")
    preferences = 0
    with open(out_dir / PREFERENCES, "w") as f:
        for r in ok:
            first = r["thinking"][0]
            if r["correct"] and not first["correct"]:
                f.write(json.dumps({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["final_answer"]}],
                                    "rejected": [{"role": "assistant", "content": first["attempt"]}],
                                    "metadata": r["metadata"]}) + "\n")
                preferences += 1
    n = len(ok)
    by_iteration = []
    for k in range(1, config.max_iterations + 1):
        solved = sum(1 for r in ok if r["source"] == "student" and r["correct"] and r["iterations"] <= k)
        by_iteration.append({"iteration": k, "correct": solved, "accuracy": solved / n if n else None})
    kept = [r for r in ok if r["kept"]]
    student = [r for r in ok if r["source"] == "student" and r["correct"]]
    solved = {"student_alone": sum(1 for r in student if r["iterations"] == 1),
              "student_after_hint": sum(1 for r in student if r["iterations"] > 1),
              "teacher_only": sum(1 for r in ok if r["source"] == "teacher" and r["correct"]),
              "unsolved": sum(1 for r in ok if not r["correct"])}
    dropped = Counter(r["dropped_reason"] or "dropped" for r in results if not r["kept"])
    report = {
        "rows_total": total_rows, "rows_processed": len(results), "rows_judged": n,
        "rows_kept": len(kept), "rows_dropped": dict(dropped),
        "errors": [{"index": r["index"], "error": r["error"]} for r in results if r.get("error")][:50],
        # Who solved each judged row: the student at its first attempt, the student after the teacher's
        # hints, the teacher's own answer, or nobody.
        "solved": solved,
        "accuracy_by_iteration": by_iteration,
        "student_first_attempt_accuracy": by_iteration[0]["accuracy"] if by_iteration else None,
        "student_final_accuracy": by_iteration[-1]["accuracy"] if by_iteration else None,
        "hints_used": sum(1 for r in ok for t in r["thinking"] if t.get("hint")),
        "teacher_answers_used": sum(1 for r in ok if r["source"] == "teacher" and r["correct"]),
        # What training on the data would see: the student's own first answers vs the enhanced rows.
        "training_data_correct_share": {
            "before": by_iteration[0]["accuracy"] if by_iteration else None,
            "after": sum(r["correct"] for r in kept) / len(kept) if kept else None,
        },
        "preference_pairs": preferences,
        "config": config.model_dump(mode="json"),
        "outputs": {"results": str(out_dir / RESULTS), "enhanced_dataset": str(out_dir / DATASET),
                    "preferences": str(out_dir / PREFERENCES)},
        **(stats or {}),
    }
    (out_dir / REPORT).write_text(json.dumps(report, indent=2))
    return report


async def enhance_rows(rows: Iterable[dict[str, Any]], config: EnhanceConfig, out_dir: str | Path, *,
                       endpoints: Mapping[str, Endpoint] | None = None,
                       local_base_url: str | None = None, local_api_key: str | None = None,
                       progress: Callable[[dict[str, Any]], None] | None = None,
                       should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run the loop over `rows` (resuming from OUT_DIR/results.jsonl), then write the artifacts.

    Roles naming an `endpoint` talk to that one of `endpoints` (declared by whoever runs the loop, never by
    the config); roles without one talk to `local_base_url` (the training service's own chat API)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)[: config.max_rows]
    done = {i for i, r in read_results(out).items() if not r.get("error")}
    endpoints = endpoints or {}
    roles = {name: ChatRole.create(name, getattr(config, name), endpoints, local_base_url, local_api_key)
             for name in ("student", "teacher")}
    judge = (ChatRole.create("judge", config.judge.role, endpoints, local_base_url, local_api_key)
             if isinstance(config.judge, ModelJudgeConfig) else None)
    enhancer = Enhancer(config, roles["student"], roles["teacher"], judge)
    started = time.monotonic()
    counts = {"done": len(done), "total": len(rows), "resumed_from": len(done), "correct": 0}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(rows)):
        if i not in done:
            queue.put_nowait(i)
    results_file = open(out / RESULTS, "a")

    def record(result: dict[str, Any]) -> None:
        results_file.write(json.dumps(result) + "\n")
        results_file.flush()
        counts["done"] += 1
        counts["correct"] += bool(result.get("correct"))
        if progress:
            progress(dict(counts))

    async def worker() -> None:
        while not queue.empty() and not should_stop():
            i = queue.get_nowait()
            try:
                prompt, reference, metadata = parse_row(rows[i], i)
            except DataFormatError as e:
                record({"index": i, "kept": False, "dropped_reason": "bad row", "detail": str(e), "thinking": []})
                continue
            if reference is None and judge is None:
                record({"index": i, "prompt": prompt, "kept": False, "dropped_reason": "no reference answer",
                        "thinking": [], "correct": False, "source": None, "iterations": 0, "metadata": metadata,
                        "reference": None, "final_answer": None})
                continue
            try:
                record(await enhancer.row(i, prompt, reference, metadata))
            except Exception as e:  # noqa: BLE001 - one row's failure is recorded; resume retries it
                record({"index": i, "error": f"{type(e).__name__}: {e}", "kept": False, "thinking": [],
                        "dropped_reason": "prompt too large" if isinstance(e, TemplateTooLarge) else "request failed"})

    try:
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    finally:
        results_file.close()
        for role in [*roles.values(), judge]:
            if role:
                await role.close()
    stats = {"elapsed_s": round(time.monotonic() - started, 3), "stopped_early": should_stop(),
             "requests": {r.name: vars(r.stats) for r in [*roles.values(), judge] if r}}
    return build_artifacts(out, config, len(rows), stats)
