"""Per-feature reports of a trained SAE (docs/METHODS.md, "Feature reports").

    from saesweep.report import ReportSettings, build_report
    built = build_report(run_dir, ReportSettings(top_n=50), sweep_run_dirs=run_dirs)
    built.index_html  # <run_dir>/report/index.html
"""

from saesweep.report.build import BuiltReport, build_report
from saesweep.report.settings import ReportSettings

__all__ = ["BuiltReport", "ReportSettings", "build_report"]
