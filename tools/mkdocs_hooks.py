"""mkdocs hook: code fences marked for the docs-example runner (```python no-run: why) are shown
as plain ```python fences, since Python-Markdown's fenced_code takes one word after the
backticks.  Fences inside another fence (an example of the syntax) are left as written."""
import re

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


def on_page_markdown(markdown, **kwargs):
    out, open_fence = [], None
    for line in markdown.split("\n"):
        m = _FENCE.match(line)
        if m and open_fence is None:
            open_fence = m["fence"]
            words = m["info"].split()
            if len(words) > 1:
                line = f"{m['indent']}{m['fence']}{words[0]}"
        elif m and m["fence"][0] == open_fence[0] and len(m["fence"]) >= len(open_fence) \
                and not m["info"].strip():
            open_fence = None
        out.append(line)
    return "\n".join(out)
