"""A YAML syntax error names the line a person has to fix, not the line after it (or one past the end of the file)
where PyYAML noticed it."""

import pytest

from lmlab.errors import RecipeError
from lmlab.recipe.loading import load_recipe


@pytest.mark.parametrize("text, message", [
    ("data:\n  path: [a\n", "line 2: not valid YAML (a flow sequence opens here and is not closed;"),
    ("run:\n  name: x\ndata: {path: a.csv\n", "line 3: not valid YAML (a flow mapping opens here and is not closed;"),
    ("run:\n  name: 'x\ndata:\n  path: a.csv\n", "line 2: not valid YAML (a quoted scalar opens here and is not closed;"),
    ("train:\n  lr 3e-4\n  batch_size: 2\n", "line 2: not valid YAML ('lr 3e-4' is not 'key: value': without its ':'"),
    ("train:\n  lr: 3e-4\n batch_size: 2\n", "line 3: not valid YAML (expected <block end>"),  # bad indent: that line
    ("train:\n  lr: 3e-4 bad: 2\n", "line 2: not valid YAML (mapping values are not allowed here)"),
    ("train:\n\tlr: 3\n", "line 2: not valid YAML (found character '\\t' that cannot start any token)"),
])
def test_a_yaml_error_names_the_line_to_fix(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}: {message}")
    assert len(str(e.value).splitlines()) == 1
