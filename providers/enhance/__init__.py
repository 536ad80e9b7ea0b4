"""Data enhancement: the student answers, a judge checks, a teacher hints, the student retries.

    from providers.enhance import EnhanceConfig, enhance_rows
    report = asyncio.run(enhance_rows(rows, EnhanceConfig(...), out_dir))

Writes OUT_DIR/results.jsonl (one line per row, appended as rows finish: an interrupted run resumes),
then enhanced_dataset.jsonl (SFT rows), preferences.jsonl (DPO rows) and enhancement_report.json.
"""

from .config import EnhanceConfig, ModelJudgeConfig, RoleConfig, RuleJudgeConfig
from .loop import build_artifacts, enhance_rows

__all__ = ["EnhanceConfig", "ModelJudgeConfig", "RoleConfig", "RuleJudgeConfig", "build_artifacts", "enhance_rows"]
