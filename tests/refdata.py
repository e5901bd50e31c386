"""Where the tests' reference data lives: inside the repository, never beside it.

`tests/data/paperbench/` is a copy of the PaperBench reference files (MIT; LICENSE.md and
NOTICE.md kept) so a clone alone runs the suite; `tests/test_no_outside_reads.py` guards that.
"""

import pathlib

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
PAPERBENCH = TESTS_DIR / "data" / "paperbench"
PAPERBENCH_PAPERS = PAPERBENCH / "papers"
PAPERBENCH_JUDGE_EVAL = PAPERBENCH / "judge_eval"
