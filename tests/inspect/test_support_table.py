"""The README's support table is the one the code gives today (``python -m tests.support_table`` regenerates it)."""

import pathlib

from tests import support_table


def test_the_readme_support_table_is_generated_from_the_code():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin, end = readme.index(support_table.BEGIN), readme.index(support_table.END) + len(support_table.END)
    assert readme[begin:end] == support_table.table(), "run `python -m tests.support_table` and paste its output"


def test_the_readme_model_table_is_generated_from_the_zoo():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin = readme.index(support_table.MODELS_BEGIN)
    end = readme.index(support_table.MODELS_END) + len(support_table.MODELS_END)
    assert readme[begin:end] == support_table.model_table(), "run `python -m tests.support_table` and paste its output"


def test_a_served_cell_and_a_fallback_cell_are_what_they_say():
    """The table's cells come from real verdicts: a causal SDPA is FA4, dropout in training is not."""
    causal, dropout = (next(f for f in support_table.FEATURES if f.name == n) for n in ("causal", "dropout (training)"))
    assert support_table.cell(causal.sdpa) == "FA4"
    assert support_table.cell(dropout.sdpa) == "PyTorch: dropout"
