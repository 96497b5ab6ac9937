"""Problem sets (JSONL/parquet, validated) and sharded, atomic, resumable stage output."""
from dapo_mcore.data.problems import Problem, ProblemSet, ProblemSetError, PromptTemplate, read_problems
from dapo_mcore.data.shards import ShardError, ShardedWriter, config_hash, iter_records, load_manifest

__all__ = ["Problem", "ProblemSet", "ProblemSetError", "PromptTemplate", "read_problems",
           "ShardError", "ShardedWriter", "config_hash", "iter_records", "load_manifest"]
