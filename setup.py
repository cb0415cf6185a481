"""Build-time only: the package's long description (everything else is in pyproject.toml).

README.md is written for a source checkout, where ``docs/dispatch.md`` and
``docs/bench/bench.png`` resolve; on a package index the same relative links
and images break, and the project has no public URL to make them absolute.
So the long description is README.md with each relative image replaced by
its alt text and the path it lives at, and each relative link by its text
and the path, both as plain text.  Absolute links and in-page anchors stay.
"""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import setup

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")


def _relative(target: str) -> bool:
    return not re.match(r"^(?:[a-z][a-z0-9+.-]*:|#|/)", target, flags=re.IGNORECASE)


def _image(match: re.Match) -> str:
    alt, target = match.groups()
    if not _relative(target):
        return match.group(0)
    return f"*({alt or 'image'}: `{target}` in the source repository)*"


def _link(match: re.Match) -> str:
    text, target = match.groups()
    if not _relative(target):
        return match.group(0)
    if text.strip("`") == target:
        return f"`{target}` (in the source repository)"
    return f"{text} (`{target}` in the source repository)"


def long_description(markdown: str) -> str:
    """``markdown`` with relative images and links turned into plain text."""
    return _LINK.sub(_link, _IMAGE.sub(_image, markdown))


if __name__ == "__main__":
    readme = Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    setup(long_description=long_description(readme), long_description_content_type="text/markdown")
