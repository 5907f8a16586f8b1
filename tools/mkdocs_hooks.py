"""mkdocs hook: code fences marked for the docs-example runner (```python no-run: why) are shown
as plain ```python fences (Python-Markdown's fenced_code takes one word after the backticks)."""
import re

_FENCE = re.compile(r"^(\s*`{3,})[ ]*([\w+-]+)[ ]+[^`\n]*$", re.M)


def on_page_markdown(markdown, **kwargs):
    return _FENCE.sub(r"\1\2", markdown)
