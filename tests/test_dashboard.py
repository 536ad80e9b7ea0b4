"""The dashboard in a real headless browser (Debian's chromium through playwright-python), Prometheus
/metrics, and `trl-post-training dashboard --data-dir` (read-only).

Checks: the page loads with no console errors, a running job appears, its loss chart has points and
gains more while it trains, cancel from the page stops the job (and every process of it); the pipeline
page shows teacher -> students -> merge; a failed job's error in the list, the compare view (overlaid curves,
final metrics, config differences) and a validation task's report. Screenshots and timings go to
test-artifacts/ (or TRL_TEST_ARTIFACTS_DIR); the ones the docs show also to docs/screenshots/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
from helpers import free_port, processes_mentioning, stop_process_group, wait_for_health, wait_until
from operator_fixtures import (
    EXAMPLES,
    REPO_ROOT,
    artifacts_dir,
    chromium_path,
    cli,
    cli_command,
    long_sft_file,
    save_json,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = chromium_path()
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A browser page that records console errors and uncaught exceptions."""

    def __init__(self, browser, base_url: str):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.base_url = base_url
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def shot(self, name: str, docs: bool = False) -> None:
        """A full-page screenshot in the artifacts folder (and in docs/screenshots/ with `docs`)."""
        self.page.screenshot(path=str(artifacts_dir() / name), full_page=True)
        if docs:
            shutil.copy(artifacts_dir() / name, REPO_ROOT / "docs" / "screenshots" / name)

    def close(self) -> None:
        self.context.close()


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"#chart-{chart}", "data-points") or 0)


def test_live_job_in_the_browser_and_cancel_from_the_page(browser, ops_service, cli_env, tmp_path):
    timings = {}
    job_file = long_sft_file(tmp_path, "dash-live", steps=3000)
    assert cli(cli_env, "submit", str(job_file)).stdout.strip() == "dash-live"
    run_dir = str(ops_service.data_dir / "runs" / "dash-live")

    p = Page(browser, ops_service.url)
    page = p.page
    t0 = time.monotonic()
    page.goto(f"{ops_service.url}/dashboard/")
    page.wait_for_selector("#login[open]")  # the service has a token: the page asks for it first
    timings["page_load_to_login_s"] = time.monotonic() - t0
    page.fill("#token", ops_service.token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("tr[data-job='dash-live']", timeout=60_000)
    timings["login_to_job_listed_s"] = time.monotonic() - t0 - timings["page_load_to_login_s"]
    wait_until(lambda: ops_service.step("dash-live") >= 2, 300, message="dash-live at step 2")
    wait_until(lambda: "in_progress" in (row := page.inner_text("tr[data-job='dash-live']")) and "– /" not in row,
               60, message="dash-live in_progress with its step in the jobs table")
    p.shot("dashboard-jobs.png")

    page.click("tr[data-job='dash-live'] a")
    page.wait_for_selector("#chart-loss", timeout=120_000)
    t1 = time.monotonic()
    first = wait_until(lambda: points(page, "loss"), 120, message="loss points")
    timings["job_page_to_first_loss_point_s"] = time.monotonic() - t1
    more = wait_until(lambda: (n := points(page, "loss")) > first and n, 120, message="more loss points")
    timings["loss_points_first_then_more"] = [first, more]
    for chart in ("lr", "tokens"):
        assert points(page, chart) > 0, chart
    # an ETA once logged steps give a rate
    wait_until(lambda: "ETA" in page.inner_text("#job-facts") and "steps/s" in page.inner_text("#job-facts"), 60,
               message="an ETA on the job page")
    assert page.inner_text("#job-facts").count("sft") >= 1
    assert "rank0" in page.inner_text("#job-log") or page.inner_text("#job-log").strip()
    p.shot("dashboard-job-running.png")

    t2 = time.monotonic()
    page.click("#cancel-job")  # first click arms, second cancels (no modal confirm)
    page.click("#cancel-job")
    page.wait_for_selector("main[data-status='cancelled'], #view[data-status='cancelled']", timeout=60_000)
    timings["cancel_click_to_cancelled_shown_s"] = time.monotonic() - t2
    assert ops_service.status("dash-live")["status"] == "cancelled"
    assert processes_mentioning(run_dir) == []
    assert page.is_enabled("#resume-job")
    p.shot("dashboard-job-cancelled.png")

    page.click("a[data-nav='nodes']")
    page.wait_for_selector("#nodes tbody tr td")
    assert "up" in page.inner_text("#nodes")
    p.shot("dashboard-nodes.png")
    assert p.errors == [], p.errors
    p.close()
    save_json("dashboard-browser-timings.json", timings)


def test_metrics_in_prometheus_format(ops_service, cli_env, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(f"{ops_service.url}/metrics").status_code == 401  # token-protected like /v1
    job_file = long_sft_file(tmp_path, "metrics-live", steps=3000)
    cli(cli_env, "submit", str(job_file))
    try:
        wait_until(lambda: ops_service.step("metrics-live") >= 3, 300, message="metrics-live at step 3")
        time.sleep(1.5)
        for _ in range(5):
            ops_service.http.get("/v1/post-training/job/status", params={"job_uuid": "metrics-live"})
        r = ops_service.http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        (artifacts_dir() / "metrics-sample.txt").write_text(r.text)
    finally:
        cli(cli_env, "cancel", "metrics-live")
    job = (("job_uuid", "metrics-live"), ("method", "sft"))
    assert samples[("trl_jobs", (("state", "in_progress"),))] == 1
    assert samples[("trl_queue_length", ())] >= 0
    assert samples[("trl_job_step", job)] >= 3
    assert samples[("trl_job_total_steps", job)] > samples[("trl_job_step", job)]
    assert samples[("trl_job_last_loss", job)] > 0
    assert samples[("trl_job_steps_per_second", job)] > 0
    assert samples[("trl_job_tokens_per_second", job)] > 0
    ages = [v for (name, labels), v in samples.items() if name == "trl_node_heartbeat_age_seconds"]
    assert len(ages) == 1 and 0 <= ages[0] < 10
    status_route = (("method", "GET"), ("route", "/v1/post-training/job/status"), ("status", "200"))
    assert samples[("trl_http_request_duration_seconds_count", status_route)] >= 5


def test_pipeline_page_and_cli_follow_teacher_students_and_merge(browser, ops_service, cli_env):
    """`pipeline run --watch` (one line per task) and the pipeline page, on the same running pipeline."""
    watcher = subprocess.Popen([*cli_command(), "pipeline", "run", str(EXAMPLES / "pipeline_teacher_students.yaml"),
                                "--pipeline-id", "dash-pipe", "--watch"], cwd=REPO_ROOT, env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = follow_pipeline_in_the_browser(browser, ops_service, watcher)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, (out, err)
    for task in ("teacher", "student logit", "student hybrid", "merge"):
        assert f"dash-pipe {task}: completed" in out, out
    assert "pipeline dash-pipe completed: merged adapter in" in out


def follow_pipeline_in_the_browser(browser, ops_service, watcher) -> tuple[str, str]:
    assert watcher.stdout.readline().strip() == "dash-pipe"  # submitted: the page can open it
    p = Page(browser, ops_service.url)
    page = p.page
    page.goto(f"{ops_service.url}/dashboard/")
    page.evaluate(f"localStorage.setItem('trl-dashboard-token', {ops_service.token!r})")
    page.goto(f"{ops_service.url}/dashboard/#/pipeline/dash-pipe")
    page.reload()
    page.wait_for_selector("#p-graph .task", timeout=60_000)
    graph = page.inner_text("#p-graph")
    assert "teacher" in graph and "student logit" in graph and "student hybrid" in graph and "merge" in graph
    wait_until(lambda: "completed" in page.inner_text("#p-state"), 600, interval=1, message="pipeline completed")
    page.wait_for_timeout(2500)  # one more refresh: every task card shows its final state
    assert page.inner_text("#p-graph").count("completed") == 4, page.inner_text("#p-graph")
    p.shot("dashboard-pipeline.png")
    assert p.errors == [], p.errors
    p.close()
    return watcher.communicate(timeout=120)


def test_data_dir_dashboard_is_read_only_without_a_token(browser, ops_service, cli_env):
    port = free_port()
    proc = subprocess.Popen([*cli_command(), "dashboard", "--data-dir", str(ops_service.data_dir), "--port", str(port)],
                            cwd=REPO_ROOT, env={k: v for k, v in cli_env.items() if k != "TRL_POST_TRAINING_TOKEN"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, timeout=60, proc=proc, path="/dashboard/api/info")
        info = httpx.get(f"{url}/dashboard/api/info").json()
        assert {k: v for k, v in info.items() if k != "headlines"} == {
            "source": "data-dir", "actions": False, "auth_required": False}
        assert info["headlines"]["grpo"][0] == "reward"  # the method table's headline metrics, for the charts
        jobs = {j["job_uuid"]: j for j in httpx.get(f"{url}/dashboard/api/jobs").json()["data"]}
        assert jobs, "the service's jobs are listed from its data dir"
        some = next(iter(jobs))
        assert httpx.post(f"{url}/dashboard/api/jobs/{some}/cancel").status_code == 403
        p = Page(browser, url)
        p.page.goto(f"{url}/dashboard/#/job/{some}")
        p.page.wait_for_selector("#job-facts div")
        assert "Read-only" in p.page.inner_text("#job-actions")
        # a long model path stays in its fact's cell (it ran under the progress bar beside it)
        overflow = p.page.eval_on_selector_all("#job-facts div", """divs => {
          const model = divs.find((d) => d.firstChild.textContent === "model");
          model.append("/models/" + "a_long_model_directory_name".repeat(4) + "/checkpoint-100");
          return model.scrollWidth - model.clientWidth; }""")
        assert overflow <= 0, overflow
        assert p.page.query_selector("#cancel-job") is None
        p.shot("dashboard-data-dir-read-only.png")
        assert p.errors == [], p.errors
        p.close()
    finally:
        stop_process_group(proc)


def first_curve(page, chart: str) -> list[float]:
    """The values a chart draws for its first series (its gaps left out)."""
    return page.eval_on_selector(chart, "b => b.plot.data[1].filter(v => v !== null)")


def ema(values: list[float], weight: float) -> list[float]:
    """W&B's (and TensorBoard's) smoothing: an exponential moving average, debiased for the first points."""
    average, out = 0.0, []
    for n, v in enumerate(values, 1):
        average = average * weight + (1 - weight) * v
        out.append(average / (1 - weight ** n))
    return out


def short_sft_file(tmp_path, job_uuid: str, **training) -> object:
    """examples/sft_lora.yaml, 8 steps, with `training` overrides."""
    import yaml

    spec = yaml.safe_load((EXAMPLES / "sft_lora.yaml").read_text())
    spec["job_uuid"] = job_uuid
    spec["dataset"] = str(EXAMPLES / "data" / "reverse_instruct.jsonl")
    spec["validation_dataset"] = str(EXAMPLES / "data" / "reverse_heldout.jsonl")
    spec["training"].update(max_steps_per_epoch=8, **training)
    spec["training"].pop("save_steps")
    spec.pop("logger", None)
    path = tmp_path / f"{job_uuid}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_failed_job_in_the_list_compare_view_and_a_validation_report(browser, ops_service, cli_env, tiny_models,
                                                                    tmp_path):
    """Two runs that differ in lr and one that fails; the list shows the failure's error on one
    line (whole on hover), the compare view overlays their curves and lists final metrics and the config
    keys that differ; a validation task's report renders on its page."""
    cli(cli_env, "submit", str(short_sft_file(tmp_path, "cmp-a", lr=3e-3)))
    cli(cli_env, "submit", str(short_sft_file(tmp_path, "cmp-b", lr=1e-3)))
    cli(cli_env, "submit", str(short_sft_file(tmp_path, "cmp-fails", max_seq_len=4)))  # no answer token survives
    for job in ("cmp-a", "cmp-b", "cmp-fails"):
        ops_service.wait(job, timeout=600)
    error = ops_service.status("cmp-fails")["resources_allocated"]["error"]
    assert ops_service.status("cmp-fails")["status"] == "failed" and "max_seq_len" in error
    prompts = [json.loads(line) for line in (EXAMPLES / "data" / "reverse_heldout.jsonl").read_text().splitlines()[:8]]
    # the teacher (it knows the task) against the student as its base: a report with a verdict to show
    r = ops_service.http.post("/v1/validations", json={"validation_id": "dash-v", "model": tiny_models["teacher"],
                                                       "base_model": tiny_models["student"], "prompts": prompts,
                                                       "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    # an enhancement with the tiny student and teacher served by the service (the teacher solves the rows)
    r = ops_service.http.post("/v1/data-enhancement", json={"enhancement_id": "dash-e", "rows": prompts[:6], "config": {
        "student": {"model": tiny_models["student"], "max_tokens": 12},
        "teacher": {"model": tiny_models["teacher"], "max_tokens": 12},
        "judge": {"type": "rule", "mode": "exact"}, "hint_template": "{question}", "max_iterations": 2}})
    assert r.status_code == 200, r.text
    for route in ("validations/dash-v", "data-enhancement/dash-e"):
        wait_until(lambda: ops_service.http.get(f"/v1/{route}").json()["state"] not in ("scheduled", "in_progress"),
                   300, interval=0.5, message=f"{route} finished")
        assert ops_service.http.get(f"/v1/{route}").json()["state"] == "completed"

    p = Page(browser, ops_service.url)
    page = p.page
    page.goto(f"{ops_service.url}/dashboard/")
    page.evaluate(f"localStorage.setItem('trl-dashboard-token', {ops_service.token!r})")
    page.reload()
    page.wait_for_selector("tr[data-job='cmp-fails'] td.clip")
    cell = "tr[data-job='cmp-fails'] td.clip"
    assert page.get_attribute(cell, "title") == error  # whole on hover
    assert "max_seq_len" in page.inner_text(cell)
    style = page.eval_on_selector(cell, "c => [getComputedStyle(c).whiteSpace, getComputedStyle(c).textOverflow]")
    assert style == ["nowrap", "ellipsis"]
    for job in ("cmp-a", "cmp-fails"):  # one line per row: no wrap inside the model name or the error
        model = f"tr[data-job='{job}'] td.model"
        assert page.eval_on_selector(model, "c => [getComputedStyle(c).whiteSpace, getComputedStyle(c).overflowWrap]") \
            == ["nowrap", "normal"]
        assert page.get_attribute(model, "title").endswith("/noisy_teacher")  # examples/sft_lora.yaml's model
    heights = page.eval_on_selector_all("#jobs tbody tr", "rows => rows.map(r => r.getBoundingClientRect().height)")
    assert max(heights) < 2 * min(heights), heights
    p.shot("dashboard-failed-job.png", docs=True)

    assert page.is_disabled("#compare")
    page.check("tr[data-job='cmp-a'] input.pick")
    page.check("tr[data-job='cmp-b'] input.pick")
    page.wait_for_timeout(2500)  # a refresh of the list keeps the ticks
    assert page.is_checked("tr[data-job='cmp-b'] input.pick") and page.inner_text("#compare") == "Compare selected (2)"
    page.click("#compare")
    page.wait_for_selector("#compare-loss[data-series='2']", timeout=30_000)
    page.wait_for_selector("#compare-eval_loss[data-series='2']")
    # each run's headline curves (SFT's: the loss) on one chart, smoothed for every chart once the slider moves
    page.wait_for_selector("#compare-headline[data-series='2']")
    records = map(json.loads, (ops_service.data_dir / "runs/cmp-a/metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in records if "loss" in r]
    assert page.eval_on_selector("#compare-headline", "b => b.plot.series.slice(1).map(s => s.label)") \
        == ["cmp-a loss", "cmp-b loss"]
    assert first_curve(page, "#compare-headline") == losses
    page.eval_on_selector("#smoothing", "i => { i.value = '0.9'; i.dispatchEvent(new Event('input')); }")
    for chart in ("#compare-headline", "#compare-loss"):
        assert first_curve(page, chart) == pytest.approx(ema(losses, 0.9)) != losses, chart
    final = page.inner_text("#compare-final")
    assert "cmp-a" in final and "cmp-b" in final and final.count("completed") == 2
    assert re.search(r"headline metrics\)\s+loss \d", final), final  # SFT's headline: its loss at the last step
    diff = page.eval_on_selector_all("#compare-diff tr[data-key]", "rows => rows.map(r => r.dataset.key)")
    assert diff == ["optimizer.lr"], diff  # paths that differ only by the run's id are not differences
    assert "0.003" in page.inner_text("#compare-diff") and "0.001" in page.inner_text("#compare-diff")
    p.shot("dashboard-compare.png", docs=True)
    page.click("a[href='#/job/cmp-a']")  # the job page draws its curves at the same smoothing
    page.wait_for_selector("#chart-loss[data-points]:not([data-points='0'])")
    assert page.input_value("#smoothing") == "0.9"
    assert first_curve(page, "#chart-loss") == pytest.approx(ema(losses, 0.9))

    page.click("a[data-nav='tasks']")
    page.wait_for_selector("#tasks-validations tr[data-task='dash-v']")
    assert "pass rate" in page.inner_text("#tasks-validations tr[data-task='dash-v']")
    page.click("#tasks-validations tr[data-task='dash-v'] a")
    page.wait_for_selector("#validation-verdict")
    report = json.loads((ops_service.data_dir / "workflows/validations/dash-v/validation.json").read_text())
    verdict = page.inner_text("#validation-verdict")
    assert ("PASSED" if report["passed"] else "FAILED") in verdict and report["verdict"]["reason"] in verdict
    assert page.eval_on_selector_all("#validation-prompts tbody tr", "rows => rows.length") == 8
    assert "base response" in page.inner_text("#validation-prompts thead")
    p.shot("dashboard-validation.png", docs=True)

    page.goto(f"{ops_service.url}/dashboard/#/task/enhancements/dash-e")
    page.wait_for_selector("#enhancement-solved")
    report = json.loads((ops_service.data_dir / "workflows/enhancements/dash-e/enhancement_report.json").read_text())
    solved = page.inner_text("#enhancement-solved")
    for label, key in [("student alone", "student_alone"), ("student after hints", "student_after_hint"),
                       ("teacher only", "teacher_only"), ("unsolved", "unsolved")]:
        assert f"{label}\n{report['solved'][key]}" in solved, solved
    assert report["solved"]["teacher_only"] > 0  # the tiny student never gets it; the teacher does
    assert page.eval_on_selector_all("#enhancement-iterations tbody tr", "rows => rows.length") == 2
    p.shot("dashboard-enhancement.png", docs=True)
    assert p.errors == [], p.errors
    p.close()


def test_task_pages_of_every_kind_on_the_data_dir_dashboard(browser, tmp_path):
    """Workflow, export, enhancement and validation pages render from a data dir's files (here written by
    the test in the shapes the service writes) with no console error, every value escaped."""
    from test_dashboard_tasks import write_task

    from providers.jobs.store import JobStore

    JobStore(tmp_path / "jobs.db")
    hostile = "<img src=x onerror=alert(1)>"
    validation = {"model": "/m/adapter", "base_model": "/m/base", "passed": True,
                  "gates": {"files": True, "inference": True, "pass_rate": True, "improvement": True},
                  "summary": {"pass_rate": 0.9, "base_pass_rate": 0.1, "checked": 10, "match": "normalized"},
                  "verdict": {"reason": "better than the base", "n": 10, "pass_rate_ci95": [0.6, 0.98],
                              "min_pass_rate": 0.5, "p_value": 0.002},
                  "prompts": [{"prompt": [{"role": "user", "content": hostile}], "expected": "a", "response": "a",
                               "passed": True, "base_response": "b", "base_passed": False}]}
    enhancement = {"rows_total": 4, "rows_kept": 3, "solved": {"student_alone": 1, "student_after_hint": 1,
                                                               "teacher_only": 1, "unsolved": 1},
                   "accuracy_by_iteration": [{"iteration": 1, "correct": 1, "accuracy": 0.25},
                                             {"iteration": 2, "correct": 2, "accuracy": 0.5}],
                   "rows_dropped": {"never correct": 1}, "errors": [{"index": 3, "error": hostile}]}
    export = {"model": "/m/adapter", "formats": ["merged", "gguf"], "merged": {"path": "/out/merged"},
              "gguf": {"path": "/out/model-f16.gguf", "modelfile": "/out/Modelfile"}}
    w = write_task(tmp_path, "workflows", "wf", "completed", "pipeline_results.json",
                   {"workflow_id": "wf", "steps": {"enhance": {"status": "completed", "elapsed_s": 3},
                                                   "train": {"status": "completed", "elapsed_s": 30},
                                                   "validate": {"status": "completed"}, "export": {"status": "failed",
                                                                                                   "error": hostile}}})
    for rel, body in [("enhance/enhancement_report.json", enhancement), ("validate/validation.json", validation),
                      ("export/export.json", export)]:
        (w / rel).parent.mkdir()
        (w / rel).write_text(json.dumps(body))
    write_task(tmp_path, "exports", "ex", "completed", "export.json", export)
    write_task(tmp_path, "validations", "va", "completed", "validation.json", validation)
    write_task(tmp_path, "enhancements", "en", "failed", "enhancement_report.json", enhancement, error=hostile)
    port = free_port()
    proc = subprocess.Popen([*cli_command(), "dashboard", "--data-dir", str(tmp_path), "--port", str(port)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, timeout=60, proc=proc, path="/dashboard/api/info")
        p = Page(browser, url)
        page = p.page
        page.goto(f"{url}/dashboard/#/tasks")
        page.wait_for_selector("#tasks-workflows tr[data-task='wf']")
        steps = "enhance completed → train completed → validate completed → export failed"
        assert steps in page.inner_text("#tasks-workflows")
        assert page.get_attribute("#tasks-enhancements tr[data-task='en'] td.clip", "title") == hostile
        page.click("#tasks-workflows tr[data-task='wf'] a")
        page.wait_for_selector("#workflow-steps")
        text = page.inner_text("#view")
        assert "student after hints" in text and "better than the base" in text and "/out/model-f16.gguf" in text
        assert hostile in page.inner_text("#workflow-steps")  # shown as text, never run
        for kind, task_id, selector in [("exports", "ex", "table.kv"), ("validations", "va", "#validation-verdict"),
                                        ("enhancements", "en", "#enhancement-solved")]:
            page.goto(f"{url}/dashboard/#/task/{kind}/{task_id}")
            page.wait_for_selector(selector)
        assert page.query_selector("img") is None
        assert p.errors == [], p.errors
        p.close()
    finally:
        stop_process_group(proc)
