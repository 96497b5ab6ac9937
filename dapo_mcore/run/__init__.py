"""The run: the stage table, the run schema and directory, stamps, output checks, the launcher, the pipeline
that iterates the table, and the report."""
