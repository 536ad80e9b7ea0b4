"""Enhancement with a teacher whose hints help: the tiny trained teacher, served by the training service,
answers the hint prompt (the question itself) with the reversed letters, and the student uses the hint.

The tiny student cannot use a hint (it reads a multi-turn conversation as noise: 0 of 10 retries right when
measured with the teacher model itself as the student), so the student here is a small OpenAI-compatible
server that knows the answers to two questions and otherwise repeats the hint it was given, returning its
reasoning beside the answer as vLLM's reasoning parsers do. What is checked is the loop's part: the
student's own accuracy rises across attempts, the report counts who solved each row, and the training rows
hold the accepted answers with their reasoning, never a rejected attempt."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import free_port, processes_mentioning, stop_process_group, wait_for_health

pytestmark = pytest.mark.slow  # starts the service and generates with the tiny teacher

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "enhance-hints-token"
REJECTED = "I do not know"


class HintFollowingStudent(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions: the known answer, else the hint of the last user message, else REJECTED."""

    known: dict[str, str] = {}

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        messages = body["messages"]
        question = next(m["content"] for m in messages if m["role"] == "user")
        hint = re.search(r"Hint: (.*)", messages[-1]["content"]) if len(messages) > 1 else None
        if question in self.known:
            answer, reasoning = self.known[question], "I remember this one"
        elif hint:
            answer, reasoning = hint.group(1).strip(), "following the hint"
        else:
            answer, reasoning = REJECTED, "a rejected guess"
        data = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": answer,
                                                    "reasoning_content": reasoning}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("enhance_hints")
    data = root / "data"
    (root / "token").write_text(TOKEN)
    port, log = free_port(), root / "service.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port), "--data-dir", str(data),
             "--api-token-file", str(root / "token"), "--allowed-model-root", str(Path(tiny_models["teacher"]).parent)],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, timeout=120, proc=proc, path="/health", log_file=log)
    yield url
    stop_process_group(proc)
    for pid, _ in processes_mentioning(str(data)):
        os.kill(pid, signal.SIGKILL)


def test_useful_hints_raise_the_students_accuracy_and_rows_hold_no_rejected_attempt(service, tiny_models, toy_data,
                                                                                    tmp_path):
    from providers.enhance import EnhanceConfig, enhance_rows
    from providers.outbound import Endpoint

    rows = toy_data["heldout_prompts"][:8]
    HintFollowingStudent.known = {r["input_query"]: r["expected_answer"] for r in rows[:2]}
    student = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HintFollowingStudent)
    threading.Thread(target=student.serve_forever, daemon=True).start()
    os.environ["ENHANCE_HINTS_KEY"] = "unused"
    config = EnhanceConfig.model_validate({
        "student": {"model": "hint-follower", "endpoint": "students"},
        "teacher": {"model": tiny_models["teacher"], "max_tokens": 12},
        "judge": {"type": "rule", "mode": "exact"}, "hint_template": "{question}",
        "max_iterations": 2, "concurrency": 2})
    try:
        report = asyncio.run(enhance_rows(
            rows, config, tmp_path, local_base_url=service + "/v1/openai/v1", local_api_key=TOKEN,
            endpoints={"students": Endpoint(base_url=f"http://127.0.0.1:{student.server_port}/v1",
                                            api_key_env="ENHANCE_HINTS_KEY")}))
    finally:
        student.shutdown()
    assert not report["errors"] and report["rows_judged"] == 8
    solved = report["solved"]
    # the teacher's hints are real generations; most are the right letters, and the student rises with them
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    hints = [t["hint"] for r in results for t in r["thinking"] if t.get("hint")]
    assert len(hints) == 6 and any(h in {r["expected_answer"] for r in rows} for h in hints)
    assert solved["student_alone"] == 2 and solved["student_after_hint"] > 0
    assert sum(solved.values()) == 8
    first, last = (b["accuracy"] for b in report["accuracy_by_iteration"])
    assert first == 2 / 8 and last == (2 + solved["student_after_hint"]) / 8 > first
    text = (tmp_path / "enhanced_dataset.jsonl").read_text()
    assert REJECTED not in text and "a rejected guess" not in text and "Hint" not in text
    answers = [json.loads(line)["messages"][-1]["content"] for line in text.splitlines()]
    assert sum(a.startswith("<think>\nfollowing the hint\n</think>\n") for a in answers) == solved["student_after_hint"]
    assert sum(a.startswith("<think>\nI remember this one\n</think>\n") for a in answers) == 2
