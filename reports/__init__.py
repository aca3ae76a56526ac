"""The HTML report (`wsolbench report`): the paper's tables beside the store's runs, timings, the λ
study and pictures, rendered from the DuckDB store alone (wsolbench.store) with jinja2 and
matplotlib. `wsolbench.reports.report.render_report` is the entry point."""
