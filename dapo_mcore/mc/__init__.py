"""Stage 2, mc: N completions per step-prefix state; MC value = mean verified reward; their first steps are
the candidate actions."""
