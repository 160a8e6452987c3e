from curvops.cli.report import fmt, table


def test_fmt():
    assert fmt(None) == "-"
    assert fmt(3) == "3"
    assert fmt(0.000123456) == "0.0001235"
    assert fmt(True) == "True" and fmt("x") == "x"


def test_table():
    assert table(["a", "b"], [[1, 2.5]]) == "| a | b |\n|---|---|\n| 1 | 2.5 |"
