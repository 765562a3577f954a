"""docs/options.md, written from the parser itself: `python -m resnet_ddp.entry.options_doc > docs/options.md`.

The test suite compares the file with this output, so the reference cannot drift from --help.
"""

from __future__ import annotations

import sys

from resnet_ddp.entry.cli import USAGE, describe_options

HEADER = f"""# Options

Every option of `python train.py` (also `python -m resnet_ddp` and `resnet-ddp`), as
`--help` gives them. Each can also be set in the environment variable named beside it;
the command line wins over the environment, and the environment over a `--scenario`
preset. `OUTPUT_DIR` (set by AstraGo) is the save dir when neither names one. This page is
written from the parser: `python -m resnet_ddp.entry.options_doc > docs/options.md`.

```
{USAGE}
```
"""


def markdown() -> str:
    parts = [HEADER]
    for title, rows in describe_options():
        parts.append(
            f"\n## {title[0].upper()}{title[1:]}\n\n| option | environment | default | what it does |\n"
            "| --- | --- | --- | --- |\n"
        )
        for flags, env, default, text in rows:
            cells = [f"`{flags}`", f"`{env}`", f"`{default}`" if default else "", text.replace("|", "\\|")]
            parts.append("| " + " | ".join(cells) + " |\n")
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(markdown())
