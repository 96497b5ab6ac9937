"""Problem-set reading: validation errors name file and line; skip_bad_rows counts; templates."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_mcore.data.problems import Problem, ProblemSetError, PromptTemplate, read_problems
from dapo_mcore.tasks.tiny import train_tokenizer

GOOD = [{"id": "a", "prompt": "1+1?", "answer": "2"}, {"id": 7, "prompt": "x?", "answer": 3.5}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet(tmp_path):
    ps = read_problems(write_jsonl(tmp_path / "p.jsonl", GOOD))
    assert ps.problems == [Problem("a", "1+1?", "2"), Problem("7", "x?", "3.5")] and ps.n_skipped == 0
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "1+1?", "answer": "2"}]), tmp_path / "p.parquet")
    assert read_problems(tmp_path / "p.parquet").problems == [Problem("a", "1+1?", "2")]


@pytest.mark.parametrize("bad,msg", [
    ('{"id": "b", "prompt": "q"}', "missing field(s) answer"),
    ('{"id": "b", "prompt": "", "answer": "1"}', "'prompt' must be a non-empty string"),
    ('{"id": "a", "prompt": "q", "answer": "1"}', "duplicate id 'a'"),
    ('{"id": "b", "prompt": "q", "answer": [1]}', "'answer' must be a string or number"),
    ('{"id": "b", "prompt": "q", "answer": true}', "'answer' must be a string or number"),
    ('{"id": "b", "prompt": "q", "answer": "1"', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_row_names_file_and_line(tmp_path, bad, msg):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD[0], "", bad, GOOD[1]])
    with pytest.raises(ProblemSetError) as e:
        read_problems(path)
    assert f"{path}:3:" in str(e.value) and msg in str(e.value)
    ps = read_problems(path, skip_bad_rows=True)
    assert [p.id for p in ps.problems] == ["a", "7"] and ps.n_skipped == 1 and f"{path}:3:" in ps.skipped[0]


def test_parquet_bad_row_and_missing_column(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "q", "answer": "1"},
                                         {"id": "b", "prompt": None, "answer": "2"}]), tmp_path / "p.parquet")
    with pytest.raises(ProblemSetError, match=r"p\.parquet:row 2: missing field\(s\) prompt"):
        read_problems(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "a", "question": "q", "answer": "1"}]), tmp_path / "q.parquet")
    with pytest.raises(ProblemSetError, match="no column"):
        read_problems(tmp_path / "q.parquet")


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(ProblemSetError, match="no such problem-set file"):
        read_problems(tmp_path / "nope.jsonl")
    with pytest.raises(ProblemSetError, match="no valid problems"):
        read_problems(write_jsonl(tmp_path / "e.jsonl", ['{"id": 1}']), skip_bad_rows=True)
    (tmp_path / "p.csv").write_text("id,prompt,answer\n")
    with pytest.raises(ProblemSetError, match="unsupported"):
        read_problems(tmp_path / "p.csv")


def test_templates():
    tok = train_tokenizer(["Question: 1+1?\nAnswer:\n"] * 10)
    p = Problem("a", "1+1? {not a field}", "2")
    t = PromptTemplate("Question: {prompt}\nAnswer:\n")
    assert t.render_text(p) == "Question: 1+1? {not a field}\nAnswer:\n"
    assert tok.decode(t.render_ids(p, tok)) == t.render_text(p)
    with pytest.raises(ValueError, match="must contain"):
        PromptTemplate("no placeholder")
    with pytest.raises(ValueError, match="chat_template"):
        PromptTemplate("chat").render_text(p, tok)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert PromptTemplate("chat", system="Be brief.").render_text(p, tok) == \
        "<system>Be brief.\n<user>1+1? {not a field}\n<assistant>"
