"""The search: its checked plan (plan), what it costs (costs), its starting weights (pretrained),
the search itself over every strategy's candidates (search), what the results say (results),
and report.md (report)."""
