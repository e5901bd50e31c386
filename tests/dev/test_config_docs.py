"""dev.config_docs: comment extraction, and docs/config_reference.md is current."""

from dev import config_docs


def test_comments_from_attribute_keyword_and_preceding_lines():
  src = (
      "c.a = ml_collections.ConfigDict()\n"
      "c.a.x = 1  # The x.\n"
      "# Two-line note\n# about y.\n"
      "c.a.y = 2\n"
      "c.s = ml_collections.ConfigDict(dict(\n"
      "    port=0,  # 0 = free port.\n"
      "))\n")
  by_path, by_leaf = config_docs.comments(src)
  assert by_path["a.x"] == "The x."
  assert by_path["a.y"] == "Two-line note about y."
  assert by_path["s.port"] == "0 = free port." and by_leaf["port"] == "0 = free port."


def test_reference_covers_every_config_and_is_current():
  text = config_docs.render()
  assert "## glm45_air.py" in text and "`model.num_experts` | `128`" in text
  assert "| `workers.num` | `5` | Worker processes" in text
  with open(config_docs.OUT, encoding="utf-8") as f:
    assert f.read() == text, "run `python -m dev.config_docs` to regenerate"
